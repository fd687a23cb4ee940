// Compare: two or more runs' curves overlaid (loss, or a metric their objective logs; by step or by tokens) and
// their config differences. A sweep's trials are picked under the sweep's name.
"use strict";

// The runs to pick from: each run, and each sweep with its trials (its box picks them all).
function comparePicker(all, chosen, go) {
  const box = (r) => el("label", el("input", { type: "checkbox", value: r.name, checked: chosen.has(r.name),
    onchange: (e) => { if (e.target.checked) chosen.add(r.name); else chosen.delete(r.name); go(); } }),
  ` ${r.group ? r.name.slice(r.group.length + 1) : r.name} `, badge(r.state));
  const groups = [...new Set(all.filter((r) => r.group).map((r) => r.group))];
  return el("div", el("div.picker", all.filter((r) => !r.group).map(box)), groups.map((g) => {
    const trials = all.filter((r) => r.group === g).sort((a, b) => a.name.localeCompare(b.name));
    return el("div.picker.sweep", { "data-group": g },
      el("label", el("input", { type: "checkbox", checked: trials.every((t) => chosen.has(t.name)),
        onchange: (e) => { for (const t of trials) if (e.target.checked) chosen.add(t.name); else chosen.delete(t.name); go(); } }),
      el("strong", ` ${g}`), " (sweep): "), trials.map(box));
  }));
}

// The metrics every chosen run logs (runs of one objective): [{key, label, validation, percent}], loss first.
function sharedMetrics(runs) {
  const lists = Object.values(runs).map((r) => r.charts.flatMap((c) => c.series.map((s) => ({ ...s,
    label: c.series.length > 1 ? `${c.title}: ${s.label}` : c.title, percent: c.percent }))));
  const loss = { key: "loss", label: "Loss", validation: true, percent: false };
  if (!lists.length) return [loss];
  return [loss, ...lists[0].filter((s) => lists.every((l) => l.some((o) => o.key === s.key)))];
}

UI.pages.compare = async (main, _, params) => {
  const chosen = new Set((params.get("runs") || "").split(",").filter(Boolean));
  const all = (await api("/api/runs")).runs;
  let byTokens = params.get("x") === "tokens";
  let metric = params.get("metric") || "loss";
  const go = () => {
    location.hash = compareHash(chosen) + (byTokens ? "&x=tokens" : "") + (metric !== "loss" ? `&metric=${metric}` : "");
  };
  const toggle = el("div.toggle", "x axis: ",
    el("label", el("input", { type: "radio", name: "cx", checked: !byTokens, onchange: () => { byTokens = false; go(); } }), " steps"),
    el("label", el("input", { type: "radio", name: "cx", checked: byTokens, onchange: () => { byTokens = true; go(); } }), " tokens"));
  append(main, el("div.toolbar", el("h1", "Compare runs")), el("section.card", el("h2", "Runs"), comparePicker(all, chosen, go)));
  if (chosen.size < 2) {
    append(main, el("p.muted", "Pick two or more runs."));
    return;
  }
  const data = await api(`/api/compare?runs=${[...chosen].map(encodeURIComponent).join(",")}`);
  const names = Object.keys(data.runs);
  const metrics = sharedMetrics(data.runs);
  const shown = metrics.find((m) => m.key === metric) || metrics[0];
  const select = el("select#compare-metric", { onchange: (e) => { metric = e.target.value; go(); } },
    metrics.map((m) => el("option", { value: m.key }, m.label)));
  select.value = shown.key;
  const tables = [], series = [];
  names.forEach((name, i) => {
    const c = runColumns([...data.runs[name].train, ...data.runs[name].evals]);
    const xs = byTokens ? c.tokens : c.step;
    // One hue per run; validation darker, dashed and dotted, so each run's two curves tell apart.
    const color = COLORS[i % COLORS.length];
    tables.push([xs, metricColumn(c, shown.key, false)]);
    series.push({ label: `${name} training`, color });
    if (shown.validation) {
      tables.push([xs, metricColumn(c, shown.key, true)]);
      series.push({ label: `${name} validation`, color: darker(color), dash: [6, 4], points: true, width: 2 });
    }
  });
  const box = el("div.chart#compare-chart");
  append(main, el("div.row", toggle, el("label.toggle", " chart: ", select),
    metrics.length > 1 ? null : el("span.muted", " (runs of one objective also compare its metrics)")),
  el("section.card", box));
  lineChart(box, { title: `${shown.label} by ${byTokens ? "tokens processed" : "optimizer step"}`,
    xLabel: byTokens ? "tokens processed" : "optimizer step", yLabel: shown.key.replace(/_/g, " "), series,
    data: joinedColumns(tables), height: 330, wholeX: !byTokens, percent: shown.percent });
  box.dataset.series = String(series.length);
  box.dataset.metric = shown.key;
  append(main, el("section.card", el("h2", "Config differences"), data.differences.length
    ? el("table.config#differences", el("thead", el("tr", el("th", "setting"), names.map((n) => el("th", n)))),
      el("tbody", data.differences.map((d) => el("tr", el("td", d.name), names.map((n) => el("td", fmt.value(d.values[n])))))))
    : el("p.muted", "The configs are the same.")));
};
