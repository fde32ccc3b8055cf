// Trend charts of the record pages, drawn with uPlot (/static/vendor/uPlot.iife.min.js) from
// the table that follows each chart: the table is the data and the accessible alternative.
// Markup (templates/record/trends.html):
//   <div class="chart" data-chart="TABLE_ID" role="img" aria-label="..."></div>
//   <button data-toggle="WRAP_ID" hidden>...</button>   shown once the chart is drawn
//   <div id="WRAP_ID"><table id="TABLE_ID">  thead th[data-series][data-low][data-high],
//        tbody tr > th[data-t] (FHIR dateTime) + td[data-v] (number or empty)
// The reference range of a series (data-low/data-high) is drawn as a band behind its line.
// Without JS (or uPlot) nothing changes: the tables stay visible. No inline script or style.
(function () {
  "use strict";

  var COLORS = ["#0b6e4f", "#b42318", "#0a58ca", "#8a4b00", "#6f42c1"];
  var BANDS = ["rgba(11,110,79,0.10)", "rgba(180,35,24,0.08)", "rgba(10,88,202,0.08)",
    "rgba(138,75,0,0.08)", "rgba(111,66,193,0.08)"];

  function num(text) {
    if (text === null || text === "") return null;
    var value = parseFloat(text);
    return isFinite(value) ? value : null;
  }

  function readTable(table) {
    var heads = table.querySelectorAll("thead th[data-series]");
    var series = [];
    heads.forEach(function (th) {
      series.push({
        label: th.getAttribute("data-series") || th.textContent.trim(),
        low: num(th.getAttribute("data-low")),
        high: num(th.getAttribute("data-high"))
      });
    });
    var xs = [];
    var ys = series.map(function () { return []; });
    table.querySelectorAll("tbody tr").forEach(function (tr) {
      var when = tr.querySelector("th[data-t]");
      var t = when ? Date.parse(when.getAttribute("data-t")) : NaN;
      if (!isFinite(t)) return;
      xs.push(t / 1000);
      var cells = tr.querySelectorAll("td");
      series.forEach(function (_, i) {
        var cell = cells[i];
        ys[i].push(cell && cell.hasAttribute("data-v") ? num(cell.getAttribute("data-v")) : null);
      });
    });
    return { series: series, data: [xs].concat(ys) };
  }

  function bandsHook(series) {
    return function (u) {
      var ctx = u.ctx;
      var left = u.bbox.left;
      var width = u.bbox.width;
      series.forEach(function (s, i) {
        if (s.low === null && s.high === null) return;
        var top = u.valToPos(s.high !== null ? s.high : u.scales.y.max, "y", true);
        var bottom = u.valToPos(s.low !== null ? s.low : u.scales.y.min, "y", true);
        ctx.save();
        ctx.fillStyle = BANDS[i % BANDS.length];
        ctx.fillRect(left, Math.min(top, bottom), width, Math.abs(bottom - top));
        ctx.restore();
      });
    };
  }

  function yRange(series, data) {
    return function (u, min, max) {
      // Keep the reference range in view so the band means something.
      series.forEach(function (s) {
        if (s.low !== null) min = Math.min(min, s.low);
        if (s.high !== null) max = Math.max(max, s.high);
      });
      if (min === max) { min -= 1; max += 1; }
      var pad = (max - min) * 0.1;
      return [min - pad, max + pad];
    };
  }

  function draw(holder) {
    var table = document.getElementById(holder.getAttribute("data-chart"));
    if (!table || typeof window.uPlot === "undefined") return;
    var parsed = readTable(table);
    if (parsed.data[0].length === 0) return;
    var width = Math.max(240, holder.clientWidth || 320);
    var opts = {
      width: width,
      height: 200,
      legend: { show: parsed.series.length > 1 },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: true }, y: { range: yRange(parsed.series, parsed.data) } },
      axes: [{}, { size: 50 }],
      series: [{}].concat(parsed.series.map(function (s, i) {
        return { label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: true,
          points: { show: true, size: 6 } };
      })),
      hooks: { drawClear: [bandsHook(parsed.series)] }
    };
    holder.textContent = "";
    var chart = new window.uPlot(opts, parsed.data, holder);
    holder.setAttribute("data-drawn", "true");
    // The chart is there: the table becomes the alternative behind its toggle button.
    var figure = holder.closest("figure");
    var toggle = figure ? figure.querySelector(".chart-toggle") : null;
    if (toggle) {
      var wrap = document.getElementById(toggle.getAttribute("data-toggle"));
      if (wrap) wrap.hidden = true;
      toggle.setAttribute("aria-expanded", "false");
      toggle.hidden = false;
    }
    return chart;
  }

  function drawAll(root) {
    var charts = [];
    (root || document).querySelectorAll(".chart[data-chart]").forEach(function (holder) {
      if (holder.getAttribute("data-drawn") === "true") return;
      var chart = draw(holder);
      if (chart) charts.push({ chart: chart, holder: holder });
    });
    var timer = null;
    window.addEventListener("resize", function () {
      window.clearTimeout(timer);
      timer = window.setTimeout(function () {
        charts.forEach(function (c) {
          c.chart.setSize({ width: Math.max(240, c.holder.clientWidth || 320), height: 200 });
        });
      }, 150);
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  } else {
    drawAll(document);
  }
  document.addEventListener("htmx:afterSettle", function (event) {
    if (event.detail && event.detail.target) drawAll(event.detail.target);
  });
})();
