// The Runs page (every run, live) and a run's page (charts, config, data, summary, answers, checkpoints, export).
"use strict";

function stepsText(row) {
  return row.total_steps ? `${row.step} / ${row.total_steps}` : row.step ? String(row.step) : "—";
}

// What a running run does now, in words: "training step 5 / 12, about 1m20s left", "validating at step 4".
function phaseText(p) {
  if (!p) return "";
  const count = p.total ? ` ${p.done ?? 0} / ${p.total}` : "";
  const eta = typeof p.eta_seconds === "number" ? `, about ${fmt.seconds(p.eta_seconds)} left` : "";
  return `${p.text}${count}${eta}`;
}

function runRow(row, selected) {
  const shown = row.group ? row.name.slice(row.group.length + 1) : row.name;
  return el(row.group ? "tr.trial" : "tr", { "data-run": row.name },
    el("td", el("input", { type: "checkbox", "aria-label": `select ${row.name}`, checked: selected.has(row.name),
      onchange: (e) => (e.target.checked ? selected.add(row.name) : selected.delete(row.name)) })),
    el("td", el("a", { href: `#/run/${encodeURIComponent(row.name)}`, title: row.name }, shown)),
    el("td.state", badge(row.state), row.why ? el("div.why", row.why) : null,
      row.phase ? el("div.phase", phaseText(row.phase)) : null),
    el("td", { title: row.model || "" }, fmt.short(row.model)),
    el("td", { title: row.data || "" }, fmt.short(row.data)),
    el("td.num", stepsText(row)),
    el("td.num", fmt.loss(row.best_val_loss)),
    el("td.num", fmt.rate(row.tokens_per_s)),
    el("td.num", { title: row.peak_memory_of || "" }, fmt.bytes(row.peak_memory)),
    el("td", fmt.time(row.started)));
}

// A sweep's line: its trials' states and best validation loss; it opens into the trials, and its box selects them
// all for Compare.
function groupRow(group, trials, selected, open, redraw) {
  const states = {};
  for (const t of trials) states[t.state] = (states[t.state] || 0) + 1;
  const best = trials.filter((t) => typeof t.best_val_loss === "number")
    .sort((a, b) => a.best_val_loss - b.best_val_loss)[0];
  const toggle = () => { if (open.has(group)) open.delete(group); else open.add(group); redraw(); };
  return el("tr.group", { "data-group": group },
    el("td", el("input", { type: "checkbox", "aria-label": `select the trials of ${group}`,
      checked: trials.every((t) => selected.has(t.name)), onchange: (e) => {
        for (const t of trials) if (e.target.checked) selected.add(t.name); else selected.delete(t.name);
        redraw();
      } })),
    el("td", el("button.link.group-toggle", { "aria-expanded": String(open.has(group)), onclick: toggle },
      `${open.has(group) ? "▾" : "▸"} ${group}`), el("div.why", `sweep: ${trials.length} trials`)),
    el("td.state", Object.entries(states).map(([state, n]) => [badge(state), ` ${n} `])),
    el("td", { title: trials[0].model || "" }, fmt.short(trials[0].model)),
    el("td", { title: trials[0].data || "" }, fmt.short(trials[0].data)),
    el("td.num", "—"),
    el("td.num", { title: best ? `${best.name}` : "" }, best ? `${fmt.loss(best.best_val_loss)}` : "—"),
    el("td.num", "—"),
    el("td.num", "—"),
    el("td", fmt.time(trials[0].started)));
}

// The rows, newest first, a sweep's trials under its line (shown when it is open).
function runRows(rows, selected, open, redraw) {
  const out = [], done = new Set();
  for (const r of rows) {
    if (!r.group) { out.push(runRow(r, selected)); continue; }
    if (done.has(r.group)) continue;
    done.add(r.group);
    const trials = rows.filter((t) => t.group === r.group);
    out.push(groupRow(r.group, trials, selected, open, redraw));
    if (open.has(r.group)) out.push(...[...trials].sort((a, b) => a.name.localeCompare(b.name)).map((t) => runRow(t, selected)));
  }
  return out;
}

UI.pages.runs = async (main) => {
  const selected = new Set();
  const open = UI.openGroups;
  const body = el("tbody");
  const shared = el("div");
  const table = el("table.runs",
    el("thead", el("tr", ["", "Run", "State", "Model", "Data", "Steps", "Best val loss", "Tokens/s", "Peak memory",
      "Started"].map((h) => el("th", h)))), body);
  append(main,
    el("div.toolbar", el("h1", "Runs"),
      el("a.button", { href: "#/new" }, "New run"),
      el("button", { onclick: () => (location.hash = compareHash(selected)) }, "Compare selected")),
    shared, table);
  let last = [];
  const show = (rows) => {
    last = rows;
    const running = rows.filter((r) => r.state === "running").map((r) => r.name);
    clear(shared, running.length > 1
      ? el("div.notice.warning", `${running.join(", ")} are training at once: they share this machine's CPU and GPU.`)
      : null);
    clear(body, rows.length ? runRows(rows, selected, open, () => show(last))
      : el("tr", el("td.empty", { colspan: 10 }, "No runs yet in this folder. Start one with New run.")));
  };
  show((await api("/api/runs")).runs);
  live("/api/events", (e) => e.type === "runs" && show(e.runs));
};

// --- A run ----------------------------------------------------------------------------------------------------

function chartCard(title) {
  const box = el("div.chart");
  return { card: el("section.card.chart-card", box), box, title };
}

function runCharts(grid, byTokens, specs) {
  const cards = {
    loss: chartCard(), lr: chartCard(), grad: chartCard(), tps: chartCard(), padding: chartCard(),
  };
  const metricCards = specs.map(() => chartCard());
  clear(grid, Object.values(cards).map((c) => c.card), metricCards.map((c) => c.card));
  const x = byTokens ? "tokens processed" : "optimizer step";
  const empty = [[], []];
  const common = { xLabel: x, wholeX: !byTokens };
  const charts = {
    loss: lineChart(cards.loss.box, { ...common, title: `Loss by ${byTokens ? "tokens" : "step"}`, yLabel: "loss",
      series: [{ label: "training loss" }, { label: "validation loss", points: true, width: 2 }], data: [[], [], []] }),
    lr: lineChart(cards.lr.box, { ...common, title: "Learning rate", yLabel: "learning rate",
      series: [{ label: "learning rate", color: COLORS[2] }], data: empty }),
    grad: lineChart(cards.grad.box, { ...common, title: "Gradient norm (before clipping)", yLabel: "norm",
      series: [{ label: "gradient norm", color: COLORS[3] }], data: empty }),
    tps: lineChart(cards.tps.box, { ...common, title: "Throughput", yLabel: "tokens / s",
      series: [{ label: "tokens/s", color: COLORS[4] }], data: empty }),
    padding: lineChart(cards.padding.box, { ...common, title: "Padding share of batch tokens", yLabel: "padding",
      series: [{ label: "padding share", color: COLORS[5] }], data: empty, percent: true }),
  };
  // The objective's metrics (preference rewards, GRPO's rewards and KL, ...): none for SFT.
  const metrics = specs.map((spec, i) => {
    const lines = metricLines(spec);
    metricCards[i].box.dataset.metric = spec.id;
    return { lines, chart: lineChart(metricCards[i].box, { ...common, title: spec.title, yLabel: spec.y_label,
      series: lines, data: [[], ...lines.map(() => [])], percent: spec.percent }) };
  });
  return {
    update(records) {
      const c = runColumns(records);
      const xs = byTokens ? c.tokens : c.step;
      charts.loss.setData([xs, c.loss, c.val]);
      charts.lr.setData([xs, c.lr]);
      charts.grad.setData([xs, c.grad]);
      charts.tps.setData([xs, c.tps]);
      charts.padding.setData([xs, c.padding]);
      for (const m of metrics) m.chart.setData([xs, ...m.lines.map((l) => metricColumn(c, ...l.column))]);
      cards.loss.box.dataset.points = String(xs.length);
    },
  };
}

function keyValues(pairs) {
  return el("table.kv", el("tbody", pairs.filter(([, v]) => v !== undefined).map(([k, v]) =>
    el("tr", el("th", k), el("td", v)))));
}

// The units the loss is a mean over (summaries before `unit` are SFT's): answer tokens, pairs, rows.
function unitsText(s) {
  const unit = s.unit || "target tokens";
  const count = fmt.int(s[unit.replace(/ /g, "_")]);
  return unit === "target tokens" ? `${fmt.int(s.tokens)} (${count} answer tokens)` : `${fmt.int(s.tokens)} in ${count} ${unit}`;
}

function summarySection(d) {
  const s = d.summary;
  if (!s) return el("p.muted", "No summary yet: it is written when training ends.");
  return keyValues([
    ["stopped because", s.stop_reason],
    ["steps", `${s.steps} (${s.epochs} epochs)`],
    ["best validation loss", s.best_val_loss === null ? "—" : `${fmt.loss(s.best_val_loss)} at step ${s.best_step}`],
    ["training time", fmt.seconds(s.train_seconds)],
    ["tokens", unitsText(s)],
    ["tokens per second", fmt.rate(s.tokens_per_s)],
    ["peak memory", s.peak_memory_bytes ? `${fmt.bytes(s.peak_memory_bytes)} (${s.peak_memory_of})` : "—"],
    ["precision / batches", `${s.precision}, ${s.packing ? "packed rows" : "padded"}, batch_size ${s.batch_size} x ${
      s.gradient_accumulation_steps}`],
    ["held-out test", s.test_after ? Object.entries(s.test_after).filter(([k]) => k !== "samples").map(([k, v]) =>
      `${k.replace("_", " ")} ${(100 * ((s.test_before || {})[k] ?? NaN)).toFixed(1)}% → ${(100 * v).toFixed(1)}%`)
      .join(", ") : "no test_data"],
    ["adapter", s.adapter],
  ]);
}

function samplesSection(d, row) {
  if (!d.samples.length && !d.test_data) {
    return el("p.muted", "No held-out answers: set test_data to see the answers before and after.");
  }
  if (!d.samples.length) {
    return el("p.muted", row.state === "running"
      ? "The answers before and after training show here when training ends."
      : "No held-out answers: the run ended before it answered its held-out test after training.");
  }
  return el("table.samples",
    el("thead", el("tr", ["Prompt", "Reference", "Before (base model)", "After (fine-tuned)"].map((h) => el("th", h)))),
    el("tbody", d.samples.map((s) => el("tr", [s.prompt, s.reference, s.before, s.after].map((t) =>
      el("td", el("pre", t ?? "—")))))));
}

// Where a checkpoint is, in words: after an optimizer step, or part-way through one (Stop between its passes).
function checkpointWhen(c) {
  return c.passes ? `part-way through step ${c.step + 1}` : `after step ${c.step}`;
}

function checkpointsSection(name, d, row) {
  const canResume = row.state !== "running" && row.state !== "done" && (d.checkpoints.length || d.config.length);
  return el("div",
    d.checkpoints.length
      ? el("ul.checkpoints", d.checkpoints.map((c) => el("li", { title: c.name },
        `${checkpointWhen(c)}, saved ${fmt.time(c.time)}`)))
      : el("p.muted", "No checkpoint yet (one is written at each evaluation)."),
    el("button#resume", { disabled: !canResume, onclick: () => act(name, "resume") },
      "Resume from the latest checkpoint"),
    row.state === "done" ? el("span.muted", " finished runs do not resume") : null);
}

function exportSection(name, d) {
  const jobLine = (job) => job ? el(`div.notice.${job.state === "failed" ? "error" : "info"}`,
    `${job.state}: ${job.line}`) : null;
  const running = (job) => !!(job && job.state === "running");
  // The page is redrawn as the run's state changes: the chosen type is kept outside it.
  const type = el("select#gguf-type", { onchange: (e) => (UI.ggufType = e.target.value) },
    ["f16", "bf16", "q8_0", "q4_0", "q4_1"].map((t) => el("option", t)));
  type.value = UI.ggufType || "f16";
  return el("div",
    el("div.row",
      el("button#merge", { disabled: !d.adapters.includes("adapter") || running(d.merge),
        onclick: () => act(name, "merge") }, "Merge base + adapter"),
      el("span.muted", " one ordinary transformers model folder, written to the runs folder's merged/")),
    jobLine(d.merge),
    el("div.row",
      el("button#export", { disabled: !d.adapters.includes("adapter") || running(d.export),
        onclick: () => act(name, "export", { type: type.value }) }, "Export GGUF"), " ", type,
      el("span.muted", " one file for llama.cpp, Ollama and LM Studio, with its Ollama Modelfile, in the run folder")),
    jobLine(d.export));
}

function configSection(d) {
  if (d.config_error) return el("p.error-text", d.config_error);
  if (!d.row.exists) return el("p.muted", "No config: the run ended before it wrote its folder.");
  return el("table.config", el("thead", el("tr", el("th", "setting"), el("th", "value"), el("th", "from"))),
    el("tbody", d.config.map((c) => el("tr", { title: c.help }, el("td", c.name), el("td", fmt.value(c.value)),
      el("td.muted", c.source)))));
}

async function act(name, action, body) {
  try {
    const r = await api(`/api/runs/${encodeURIComponent(name)}/${action}`, { method: "POST", body });
    if (r.warning) notice("warning", r.warning);
    notice("info", r.command ? `started: ${r.command}`
      : "Stopping: the run saves a checkpoint after its current pass, then exits.");
    if (UI.refreshRun) await UI.refreshRun();
  } catch (e) {
    notice("error", e.message);
  }
}

UI.pages.run = async (main, name) => {
  const url = `/api/runs/${encodeURIComponent(name)}`;
  const head = el("div.toolbar");
  const failure = el("div");
  const grid = el("div.charts");
  const sections = el("div.sections");
  let byTokens = false;
  let records = [];
  let specs = [];
  let charts;
  const toggle = el("div.toggle", "x axis: ",
    el("label", el("input", { type: "radio", name: "x", checked: true, onchange: () => redraw(false) }), " steps"),
    el("label", el("input", { type: "radio", name: "x", onchange: () => redraw(true) }), " tokens"));
  const redraw = (tokens) => { byTokens = tokens; charts = runCharts(grid, byTokens, specs); charts.update(records); };
  append(main, head, failure, toggle, grid, sections);

  let lastKey = "";
  let working = false;
  const refresh = async (row) => {
    const d = await api(url);
    working = [d.merge, d.export].some((job) => job && job.state === "running");
    row = row || d.row;
    clear(head, el("h1", name), badge(row.state), el("span.why", row.why || ""),
      el("span.phase#phase", phaseText(row.phase)),
      el("span.spacer"),
      el("button#stop", { disabled: row.state !== "running" || row.outside, onclick: () => act(name, "stop"),
        title: row.outside ? "started in a terminal: Ctrl-C there" : "save a checkpoint, then exit (as Ctrl-C)" },
      "Stop"),
      el("a.button", { href: `#/try?run=${encodeURIComponent(name)}` }, "Try it"),
      el("a.button", { href: `#/compare?runs=${encodeURIComponent(name)}` }, "Compare"));
    clear(failure, row.state === "failed" ? el("div.notice.error.failure", row.why) : null,
      row.bad_metrics_lines ? el("div.notice.warning", `${row.bad_metrics_lines} damaged line(s) in metrics.jsonl were skipped`) : null,
      // A run that failed before it made its folder has its failure above; any other has lost its folder.
      row.exists || row.state === "failed" ? null : el("div.notice.warning", "The run folder is gone (deleted?)."));
    clear(sections,
      el("section.card", el("h2", "Summary"), summarySection(d)),
      el("section.card", el("h2", "Held-out answers, before and after"), samplesSection(d, row)),
      el("section.card.half", el("h2", "Checkpoints"), checkpointsSection(name, d, row)),
      el("section.card.half", el("h2", "Export"), exportSection(name, d)),
      el("section.card.half", el("h2", "Data"), d.data.length
        ? el("ul", d.data.map((l) => el(l.warning ? "li.warn" : "li", l.text))) : el("p.muted", "No data report yet.")),
      el("section.card.half", el("h2", "Resolved by the run"), d.resolved ? keyValues(Object.entries(d.resolved)
        .map(([k, v]) => [k, fmt.value(v)])) : el("p.muted", "Not resolved yet.")),
      el("section.card", el("h2", "Config, and where each value came from"),
        d.command ? el("p", el("code", d.command)) : null, configSection(d)),
      d.log.length ? el("section.card", el("details", { open: row.state === "failed" },
        el("summary", "Output of the last start"), el("pre.log", d.log.join("\n")))) : null);
    return d;
  };
  specs = (await refresh()).charts;
  charts = runCharts(grid, byTokens, specs);
  UI.refreshRun = () => refresh().catch((err) => notice("error", err.message));
  UI.cleanup.push(() => (UI.refreshRun = null));
  live(`${url}/events`, (e) => {
    if (e.type === "metrics") {
      records = e.reset ? e.records : records.concat(e.records);
      // The first step lines say which metrics the objective logs: their charts are added then.
      if (JSON.stringify(e.charts) !== JSON.stringify(specs)) {
        specs = e.charts;
        charts = runCharts(grid, byTokens, specs);
      }
      charts.update(records);
    } else if (e.type === "row") {
      const phase = document.getElementById("phase");
      if (phase) phase.textContent = phaseText(e.row.phase);
      const key = `${e.row.state}|${e.row.why}|${e.row.checkpoints}|${e.row.exists}|${e.row.bad_metrics_lines}`;
      if (key !== lastKey) { lastKey = key; refresh(e.row).catch((err) => notice("error", err.message)); }
    }
  });
  // A merge or an export writes no metrics: look again until it ends.
  const timer = setInterval(() => working && refresh().catch(() => {}), 2000);
  UI.cleanup.push(() => clearInterval(timer));
};
