// Compare: two or more runs' loss curves overlaid (by step or by tokens) and their config differences.
"use strict";

UI.pages.compare = async (main, _, params) => {
  const chosen = new Set((params.get("runs") || "").split(",").filter(Boolean));
  const all = (await api("/api/runs")).runs;
  const picker = el("div.picker", all.map((r) => el("label", el("input", { type: "checkbox", value: r.name,
    checked: chosen.has(r.name), onchange: (e) => {
      if (e.target.checked) chosen.add(r.name); else chosen.delete(r.name);
      location.hash = compareHash(chosen);
    } }), ` ${r.name} `, badge(r.state))));
  let byTokens = params.get("x") === "tokens";
  const setX = (tokens) => {
    location.hash = compareHash(chosen) + (tokens ? "&x=tokens" : "");
  };
  const toggle = el("div.toggle", "x axis: ",
    el("label", el("input", { type: "radio", name: "cx", checked: !byTokens, onchange: () => setX(false) }), " steps"),
    el("label", el("input", { type: "radio", name: "cx", checked: byTokens, onchange: () => setX(true) }), " tokens"));
  append(main, el("div.toolbar", el("h1", "Compare runs")), el("section.card", el("h2", "Runs"), picker));
  if (chosen.size < 2) {
    append(main, el("p.muted", "Pick two or more runs."));
    return;
  }
  const data = await api(`/api/compare?runs=${[...chosen].map(encodeURIComponent).join(",")}`);
  const names = Object.keys(data.runs);
  const tables = [], series = [];
  names.forEach((name, i) => {
    const c = runColumns([...data.runs[name].train, ...data.runs[name].evals]);
    const xs = byTokens ? c.tokens : c.step;
    // One hue per run; validation darker, dashed and dotted, so each run's two curves tell apart.
    const color = COLORS[i % COLORS.length];
    tables.push([xs, c.loss], [xs, c.val]);
    series.push({ label: `${name} training`, color },
      { label: `${name} validation`, color: darker(color), dash: [6, 4], points: true, width: 2 });
  });
  const box = el("div.chart#compare-chart");
  append(main, toggle, el("section.card", box));
  lineChart(box, { title: `Loss by ${byTokens ? "tokens processed" : "optimizer step"}`,
    xLabel: byTokens ? "tokens processed" : "optimizer step", yLabel: "loss", series, data: joinedColumns(tables),
    height: 330, wholeX: !byTokens });
  box.dataset.series = String(series.length);
  append(main, el("section.card", el("h2", "Config differences"), data.differences.length
    ? el("table.config#differences", el("thead", el("tr", el("th", "setting"), names.map((n) => el("th", n)))),
      el("tbody", data.differences.map((d) => el("tr", el("td", d.name), names.map((n) => el("td", fmt.value(d.values[n])))))))
    : el("p.muted", "The configs are the same.")));
};
