// Usage charts: the numbers come from the page (json_script "usage-chart-data"); the tables
// below the charts show the same numbers.
(function () {
  "use strict";
  var PALETTE = ["#2557d6", "#1f7a44", "#9a6200", "#b42318", "#6b3fd4", "#0e7490", "#be185d", "#5b6473"];

  function money(currency) {
    return function (value) {
      return Number(value).toFixed(value !== 0 && Math.abs(value) < 0.01 ? 4 : 2) + " " + currency;
    };
  }

  function draw() {
    var source = document.getElementById("usage-chart-data");
    if (!source || typeof window.Chart !== "function") return;
    var data = JSON.parse(source.textContent);
    var format = money(data.currency);
    var tooltip = {
      callbacks: {
        label: function (item) {
          return (item.dataset.label || item.label) + ": " + format(item.raw);
        },
      },
    };
    var byDay = document.getElementById("usage-by-day");
    if (byDay) {
      new window.Chart(byDay, {
        type: "bar",
        data: {
          labels: data.days,
          datasets: data.series.map(function (series, i) {
            return { label: series.label, data: series.amounts, backgroundColor: PALETTE[i % PALETTE.length] };
          }),
        },
        options: {
          maintainAspectRatio: false,
          animation: false,
          scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: data.currency } } },
          plugins: { tooltip: tooltip },
        },
      });
    }
    var byItem = document.getElementById("usage-by-item");
    if (byItem) {
      new window.Chart(byItem, {
        type: "doughnut",
        data: {
          labels: data.items.map(function (item) { return item.label; }),
          datasets: [{
            data: data.items.map(function (item) { return item.amount; }),
            backgroundColor: data.items.map(function (_, i) { return PALETTE[i % PALETTE.length]; }),
          }],
        },
        options: {
          maintainAspectRatio: false,
          animation: false,
          plugins: {
            legend: { position: "right" },
            tooltip: { callbacks: { label: function (item) { return item.label + ": " + format(item.raw); } } },
          },
        },
      });
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", draw);
  else draw();
})();
