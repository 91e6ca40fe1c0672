// The sandbox page's terminal: xterm.js over the agent's process WebSocket.
// The page asks the dashboard for a short-lived ticket (a browser cannot put an
// Authorization header on a WebSocket), opens /runtime/v1/process?ticket=… on the
// data plane and starts a login shell in a PTY; output frames carry base64 data.
(function () {
  "use strict";
  var SHELL = "if command -v bash >/dev/null 2>&1; then exec bash -l; else exec sh -l; fi";
  var encoder = new TextEncoder();

  function toBase64(bytes) {
    var text = "";
    for (var i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return window.btoa(text);
  }

  function fromBase64(data) {
    var text = window.atob(data || "");
    var bytes = new Uint8Array(text.length);
    for (var i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  var session = null;

  function open(form) {
    var status = document.getElementById("terminal-status");
    var box = document.getElementById("terminal");
    if (!window.Terminal || !window.FitAddon) {
      status.textContent = "The terminal could not load.";
      return;
    }
    if (session) session.close();
    box.hidden = false;
    box.textContent = "";
    var term = new window.Terminal({ cursorBlink: true, convertEol: false, fontSize: 13 });
    var fit = new window.FitAddon.FitAddon();
    term.loadAddon(fit);
    term.open(box);
    fit.fit();
    status.textContent = "Connecting…";
    var body = new FormData(form);
    fetch(form.action, { method: "POST", body: body, credentials: "same-origin" })
      .then(function (response) {
        return response.json().then(function (data) {
          if (!response.ok) throw new Error(data.message || "The terminal was refused.");
          return data;
        });
      })
      .then(function (data) { session = connect(data.url, term, fit, status); })
      .catch(function (error) { status.textContent = error.message; });
  }

  function connect(url, term, fit, status) {
    var socket = new WebSocket(url);
    var started = false;
    function send(frame) {
      if (socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(frame));
    }
    socket.addEventListener("open", function () {
      send({ type: "start", cmd: "/bin/sh", args: ["-c", SHELL], pty: { cols: term.cols, rows: term.rows }, tag: "dashboard-terminal" });
    });
    socket.addEventListener("message", function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      if (frame.type === "started") {
        started = true;
        status.textContent = "Connected (process " + frame.pid + ").";
        term.focus();
      } else if (frame.type === "pty" || frame.type === "stdout" || frame.type === "stderr") {
        term.write(fromBase64(frame.data));
      } else if (frame.type === "exit") {
        status.textContent = "The shell exited (" + (frame.exit_code === undefined ? frame.status : frame.exit_code) + ").";
      } else if (frame.type === "error") {
        status.textContent = frame.message || "The sandbox refused the shell.";
      } else if (frame.type === "lagged") {
        status.textContent = "The terminal fell behind and was disconnected; open it again.";
      }
    });
    socket.addEventListener("close", function () {
      if (!started) status.textContent = "Could not connect: is the sandbox running (or paused with auto-resume)?";
      else if (status.textContent.indexOf("exited") < 0) status.textContent = "Disconnected.";
    });
    var input = term.onData(function (data) { send({ type: "stdin", data: toBase64(encoder.encode(data)) }); });
    var resize = term.onResize(function (size) { send({ type: "resize", cols: size.cols, rows: size.rows }); });
    function refit() { fit.fit(); }
    window.addEventListener("resize", refit);
    return {
      close: function () {
        window.removeEventListener("resize", refit);
        input.dispose();
        resize.dispose();
        socket.close();
        term.dispose();
      }
    };
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches("[data-terminal-form]")) return;
    event.preventDefault();
    open(form);
  });
})();
