// Sandbox pages: clickable list rows, the metrics chart and file uploads (no framework).
(function () {
  "use strict";

  // List: a click anywhere on a row opens the sandbox (the id cell is a real link).
  document.addEventListener("click", function (event) {
    if (event.target.closest("a, button, input, select, label")) return;
    var row = event.target.closest("tr[data-sandbox-id][data-href]");
    if (row) window.location.href = row.getAttribute("data-href");
  });

  // Detail: CPU and memory, one sample every 5 s, the last 60 kept (5 minutes).
  function startMetrics() {
    var canvas = document.getElementById("metrics-chart");
    if (!canvas || !window.Chart) return;
    var url = canvas.getAttribute("data-metrics-url");
    var chart = new window.Chart(canvas, {
      type: "line",
      data: {
        labels: [],
        datasets: [
          { label: "CPU %", data: [], yAxisID: "cpu", borderColor: "#2557d6", tension: 0.2, pointRadius: 0 },
          { label: "Memory MiB", data: [], yAxisID: "mem", borderColor: "#1f7a44", tension: 0.2, pointRadius: 0 }
        ]
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          cpu: { type: "linear", position: "left", min: 0, max: 100, title: { display: true, text: "CPU %" } },
          mem: { type: "linear", position: "right", min: 0, grid: { drawOnChartArea: false }, title: { display: true, text: "MiB" } }
        }
      }
    });
    var busy = false;
    function sample() {
      if (busy || document.hidden) return;
      busy = true;
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) { return response.ok ? response.json() : { metrics: [] }; })
        .then(function (body) {
          (body.metrics || []).forEach(function (m) {
            chart.data.labels.push(new Date(m.timestamp).toLocaleTimeString());
            chart.data.datasets[0].data.push(m.cpu_used_pct);
            chart.data.datasets[1].data.push(Math.round(m.mem_used / 1048576));
            chart.options.scales.mem.max = m.memory_mb;
          });
          while (chart.data.labels.length > 60) {
            chart.data.labels.shift();
            chart.data.datasets.forEach(function (d) { d.data.shift(); });
          }
          chart.update();
        })
        .catch(function () { /* the next sample tries again */ })
        .then(function () { busy = false; });
    }
    sample();
    window.setInterval(sample, 5000);
  }

  // Detail: upload a file into the directory the browser shows. The server signs a
  // write URL for that one path; the bytes go straight to the data-plane edge.
  function csrf(form) {
    var input = form.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (!form.matches("[data-upload-form]")) return;
    event.preventDefault();
    var status = document.getElementById("upload-status");
    var input = form.querySelector("input[type=file]");
    var listing = document.querySelector("#file-browser [data-directory]");
    var directory = listing ? listing.getAttribute("data-directory") : "";
    if (!input.files.length || !directory) {
      status.textContent = "Choose a file, and open a directory first.";
      return;
    }
    var file = input.files[0];
    var ask = new FormData();
    ask.append("directory", directory);
    ask.append("name", file.name);
    status.textContent = "Uploading " + file.name + "…";
    fetch(form.action, { method: "POST", body: ask, credentials: "same-origin", headers: { "X-CSRFToken": csrf(form) } })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body.message || "The upload was refused.");
          return body;
        });
      })
      .then(function (body) {
        var data = new FormData();
        data.append("file", file, file.name);
        // no-cors: the data plane may live on its own origin; the listing shows the result
        return fetch(body.url, { method: "POST", body: data, mode: "no-cors", credentials: "omit" }).then(function (response) {
          if (response.type !== "opaque" && !response.ok) throw new Error("The sandbox refused the upload (" + response.status + ").");
          status.textContent = "Uploaded " + body.path + ".";
          form.reset();
          if (window.htmx) {
            window.htmx.ajax("GET", document.getElementById("file-browser").getAttribute("hx-get") + "?path=" + encodeURIComponent(directory), { target: "#file-browser" });
          }
        });
      })
      .catch(function (error) { status.textContent = error.message; });
  });

  document.addEventListener("DOMContentLoaded", startMetrics);
})();

// Detail: the lifecycle buttons follow the live state (`data-when`: the state it applies
// in; `data-unless`: the state it does not). A button the role disables stays disabled.
(function () {
  "use strict";
  function apply() {
    var live = document.getElementById("sandbox-live");
    if (!live) return;
    var state = live.getAttribute("data-state");
    document.querySelectorAll("button[data-when], button[data-unless]").forEach(function (button) {
      if (button.hasAttribute("data-role-off")) return;
      var when = button.getAttribute("data-when");
      var unless = button.getAttribute("data-unless");
      var off = (when && when !== state) || (unless && unless === state);
      button.disabled = !!off;
      button.title = off ? "Not while the sandbox is " + state + "." : "";
    });
  }
  document.addEventListener("DOMContentLoaded", apply);
  document.addEventListener("htmx:afterSettle", apply);
})();
