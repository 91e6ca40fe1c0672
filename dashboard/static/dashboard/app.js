// Small behaviours shared by every dashboard page (no build step, no framework).
(function () {
  "use strict";
  document.addEventListener("change", function (event) {
    var el = event.target;
    if (el.matches && el.matches("[data-autosubmit]") && el.form) el.form.submit();
  });
  // Buttons and forms that destroy something ask first.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var message = form.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  });
  // Copy buttons: <button data-copy="#element-id">.
  document.addEventListener("click", function (event) {
    var button = event.target.closest && event.target.closest("[data-copy]");
    if (!button) return;
    var source = document.querySelector(button.getAttribute("data-copy"));
    if (source && navigator.clipboard) {
      navigator.clipboard.writeText(source.textContent.trim()).then(function () {
        button.textContent = "Copied";
      });
    }
  });
  // Local times: <time datetime="..."> gets the viewer's own zone in its title.
  function localise(root) {
    root.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.getAttribute("datetime"));
      if (!isNaN(d)) t.title = d.toLocaleString();
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localise(document); });
  document.addEventListener("htmx:afterSwap", function (event) { localise(event.target); });
})();

// Live regions that htmx replaces (the sandbox list, a sandbox's state) keep the keyboard
// focus: the focused link or button is found again in the new content by its row and text.
(function () {
  "use strict";
  var kept = null;
  document.addEventListener("htmx:beforeSwap", function (event) {
    var focused = document.activeElement;
    var target = event.detail.target;
    kept = null;
    if (!focused || focused === document.body || !target || !target.contains(focused)) return;
    var row = focused.closest("[data-sandbox-id]");
    kept = {
      row: row ? row.getAttribute("data-sandbox-id") : null,
      tag: focused.tagName,
      text: (focused.textContent || "").trim()
    };
  });
  document.addEventListener("htmx:afterSettle", function () {
    if (!kept) return;
    var scope = kept.row ? document.querySelector('[data-sandbox-id="' + kept.row + '"]') : document;
    var candidates = scope ? scope.querySelectorAll(kept.tag.toLowerCase()) : [];
    for (var i = 0; i < candidates.length; i++) {
      if ((candidates[i].textContent || "").trim() === kept.text) {
        candidates[i].focus();
        break;
      }
    }
    kept = null;
  });
})();
