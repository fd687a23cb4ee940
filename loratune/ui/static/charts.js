// Charts (uPlot, vendored): each with a title, labelled axes and a legend.
"use strict";

const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 1e5, 2e5, 5e5, 1e6];
const COLORS = ["#1f6fb4", "#e4731b", "#2a9d3f", "#c9302c", "#7a52b3", "#8c564b", "#d4509e", "#138a9e"];

// The colour "#rrggbb" at half its brightness.
function darker(color) {
  const n = parseInt(color.slice(1), 16);
  return `rgb(${(n >> 16) >> 1}, ${((n >> 8) & 255) >> 1}, ${(n & 255) >> 1})`;
}

function axisNumber(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a >= 1e6) return `${+(v / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${+(v / 1e3).toPrecision(3)}k`;
  if (a !== 0 && a < 1e-2) return v.toExponential(1).replace("e-", "e-");
  return `${+v.toPrecision(4)}`;
}

// A line chart in `container`: series [{label, color, dash, points}], data [x, ...ys].
function lineChart(container, { title, xLabel, yLabel, series, data, height = 230, percent = false, wholeX = false }) {
  const format = percent ? (v) => (v === null || v === undefined ? "" : `${+(v * 100).toFixed(1)}%`) : axisNumber;
  const opts = {
    title,
    width: Math.max(320, container.clientWidth - 4),
    height,
    scales: {
      x: { time: false },
      // A share stays on 0-100% (all-zero padding would otherwise stretch the axis to nothing).
      y: percent ? { range: (u, min, max) => [0, Math.max(0.05, max * 1.1)] } : {},
    },
    axes: [
      { label: xLabel, values: (u, splits) => splits.map(axisNumber), labelSize: 22, incrs: wholeX ? WHOLE : undefined },
      { label: yLabel, values: (u, splits) => splits.map(format), size: 64, labelSize: 22 },
    ],
    series: [
      { label: xLabel, value: (u, v) => axisNumber(v) },
      ...series.map((s, i) => ({
        label: s.label,
        stroke: s.color || COLORS[i % COLORS.length],
        width: s.width || 1.6,
        dash: s.dash,
        spanGaps: true,
        points: { show: s.points ?? ((u) => u.data[0].length < 60), size: s.pointSize || 5 },
        value: (u, v) => format(v),
      })),
    ],
    cursor: { drag: { x: true, y: false } },
  };
  const chart = new uPlot(opts, data, container);
  const resize = new ResizeObserver(() => {
    const width = Math.max(320, container.clientWidth - 4);
    if (Math.abs(width - chart.width) > 2) chart.setSize({ width, height });
  });
  resize.observe(container);
  UI.cleanup.push(() => { resize.disconnect(); chart.destroy(); });
  return chart;
}

// A run's metrics records as chart columns: x by step and by tokens processed, validation losses at their steps.
function runColumns(records) {
  const c = { step: [], tokens: [], loss: [], val: [], lr: [], grad: [], tps: [], padding: [], rows: [], evalAt: new Map() };
  const index = new Map();
  let tokens = 0;
  for (const r of records) {
    if (r.event !== "train") continue;
    tokens += r.tokens || 0;
    index.set(r.step, c.step.length);
    c.step.push(r.step);
    c.tokens.push(tokens);
    c.loss.push(r.loss ?? null);
    c.val.push(null);
    c.lr.push(r.lr ?? null);
    c.grad.push(r.grad_norm ?? null);
    c.tps.push(r.tokens_per_s ?? null);
    c.padding.push(r.padding_share ?? null);
    c.rows.push(r);
  }
  for (const r of records) {
    if (r.event === "eval" && index.has(r.step)) {
      c.val[index.get(r.step)] = r.val_loss;
      c.evalAt.set(r.step, r);
    }
  }
  return c;
}

// One metric's column: its value in each step line, or (validation) in the eval line at that step.
function metricColumn(c, key, validation) {
  return validation ? c.rows.map((r) => (c.evalAt.get(r.step) || {})[`val_${key}`] ?? null)
    : c.rows.map((r) => r[key] ?? null);
}

// The lines of an objective's metric chart (the server's description): one hue per metric, its validation darker
// and dashed beside it. Each line with the column it draws: [key, validation].
function metricLines(spec) {
  const lines = [];
  spec.series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    lines.push({ label: s.validation ? `${s.label} (training)` : s.label, color, column: [s.key, false] });
    if (s.validation) {
      lines.push({ label: `${s.label} (validation)`, color: darker(color), dash: [6, 4], points: true, width: 2,
        column: [s.key, true] });
    }
  });
  return lines;
}

// Overlaid curves of several runs whose x values differ: uPlot.join aligns them on one x axis.
function joinedColumns(tables) {
  if (!tables.length) return [[]];
  return uPlot.join(tables);
}
