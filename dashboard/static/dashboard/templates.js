// The build log page: keep the log scrolled to its end while new lines arrive, unless the
// reader scrolled up to read an earlier part.
(function () {
  "use strict";
  function log() { return document.getElementById("build-log"); }
  function atEnd(el) { return el.scrollHeight - el.scrollTop - el.clientHeight < 40; }
  var follow = true;
  document.addEventListener("DOMContentLoaded", function () {
    var el = log();
    if (!el) return;
    el.scrollTop = el.scrollHeight;
    el.addEventListener("scroll", function () { follow = atEnd(el); });
  });
  document.addEventListener("htmx:afterSwap", function (event) {
    var el = log();
    if (el && event.target === el && follow) el.scrollTop = el.scrollHeight;
  });
})();
