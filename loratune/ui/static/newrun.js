// The New run page: the Training Guide's nine settings first (help texts, the Guide's warnings as you type), then
// model and data; what `loratune plan` and `loratune data inspect` say; Start runs `loratune train`.
"use strict";

function shownValue(v) {
  if (v === null || v === undefined) return "";
  if (Array.isArray(v)) return v.join(",");
  if (typeof v === "object") return Object.entries(v).map(([k, x]) => `${k}=${x}`).join(",");
  return String(v);
}

function fieldInput(f, onChange) {
  const id = `f-${f.name}`;
  if (f.kind === "bool") return el("input", { id, type: "checkbox", onchange: onChange });
  if (f.kind === "choice") return el("select", { id, onchange: onChange }, f.choices.map((c) => el("option", { value: c }, c)));
  return el("input", { id, type: "text", autocomplete: "off", spellcheck: "false", oninput: onChange });
}

function uploadButton(f, input, changed) {
  const file = el("input", { type: "file", accept: ".jsonl,.json,.csv,.tsv,.parquet", hidden: true,
    onchange: async () => {
      const chosen = file.files[0];
      if (!chosen) return;
      try {
        const r = await api(`/api/upload?name=${encodeURIComponent(chosen.name)}`, { method: "POST", raw: chosen });
        input.value = r.path;
        changed(f.name);
        notice("info", `uploaded ${chosen.name} to ${r.path}`);
      } catch (e) { notice("error", e.message); }
    } });
  return [file, el("button.small", { type: "button", onclick: () => file.click() }, "Upload…")];
}

// The rough estimate's range (from a matrix-product benchmark); a measured or given throughput has none.
function likely(range) {
  return range ? `, likely ${fmt.seconds(range[0])} to ${fmt.seconds(range[1])}` : "";
}

function planView(r, useIt) {
  const out = [];
  if (r.plan) {
    const p = r.plan;
    const spare = p.budget !== null ? p.budget - p.total : null;
    out.push(el("h3", "Memory and time (loratune plan)"),
      p.fits === null ? null : el(`div.verdict.${p.fits ? "fits" : "nofit"}`, p.fits
        ? `Fits: about ${fmt.bytes(p.total)} at the peak, ${fmt.bytes(spare)} to spare`
        : `Does not fit: about ${fmt.bytes(p.total)} at the peak, ${fmt.bytes(-spare)} short`),
      keyValues([
        ["device", `${p.device} (${p.budget_source})`],
        ["batch", `batch_size ${p.batch_size} x gradient_accumulation_steps ${p.gradient_accumulation_steps}`],
        ["time per epoch", p.epoch_seconds !== null ? `about ${fmt.seconds(p.epoch_seconds)}${likely(p.epoch_seconds_range)} (${
          fmt.int(p.epoch_tokens)} tokens at ${fmt.rate(p.tokens_per_second)} tokens/s, ${p.throughput_source})` : "unknown"],
        ["trainable", `${fmt.int(p.trainable_params)} of ${fmt.int(p.total_params)} parameters`],
      ]),
      p.fixes.length ? el("div", el("p", "To make it fit, change one of:"), el("ul", p.fixes.map((x) => el("li", x)))) : null,
      el("details", el("summary", "the itemised plan"), el("pre", r.plan_text)));
  } else out.push(el("div.notice.error", `plan: ${r.plan_error}`));
  if (r.inspect) {
    const ins = r.inspect;
    const biggest = Math.max(1, ...ins.histogram.map((h) => h[2]));
    out.push(el("h3", "Data lengths (loratune data inspect)"),
      el("p", `${ins.n_train} training, ${ins.n_val} validation examples; tokens per example: median ${
        ins.total.percentiles["50"]}, 99% ≤ ${ins.total.percentiles["99"]}, longest ${ins.total.max}`),
      el("div.histogram", { role: "img", "aria-label": "histogram of example lengths in tokens" },
        ins.histogram.map(([from, to, n]) => el("div.bar-row", el("span.bar-label", `${from}–${to}`),
          el("span.bar", { style: `width:${(100 * n) / biggest}%` }), el("span.bar-n", String(n))))),
      el("p.muted", "examples by length in tokens (prompt + answer, as the model sees them)"),
      ins.recommended ? el("div.recommend", `Recommended max_length: ${ins.recommended} (keeps ${ins.percentile}% whole`,
        ins.at_recommended ? `, ${ins.at_recommended.fit.truncated} truncated, ${ins.at_recommended.fit.dropped_too_long} dropped` : "",
        ")", el("button#use-it", { type: "button", onclick: () => useIt(ins.recommended) }, "Use it")) : null,
      el("p", `at max_length ${ins.current.max_length}: ${ins.current.whole} whole, ${ins.current.fit.truncated} truncated, ${
        ins.current.fit.dropped_too_long} dropped; padding in padded batches ${(100 * ins.current.padding_share).toFixed(0)}%`),
      ins.memory.map((m) => el("p.muted", m)));
  } else out.push(el("p.muted", `data: ${r.inspect_error}`));
  return out;
}

UI.pages.new = async (main) => {
  const schema = await api("/api/form");
  const fields = Object.fromEntries(schema.fields.map((f) => [f.name, f]));
  const inputs = {}, warns = {}, touched = new Set();
  let preset = schema.default_preset, planned = null, timer = null;
  const baseline = () => ({ ...Object.fromEntries(schema.fields.map((f) => [f.name, f.default])),
    ...(schema.presets[preset] || { values: {} }).values });
  const read = (name) => (fields[name].kind === "bool" ? inputs[name].checked : inputs[name].value.trim());
  const values = () => {
    const base = baseline(), out = {};
    for (const f of schema.fields) {
      const v = read(f.name);
      if (f.kind === "bool" ? v !== !!base[f.name] : v !== shownValue(base[f.name])) out[f.name] = v;
    }
    return out;
  };
  const show = () => {
    const base = baseline();
    for (const f of schema.fields) {
      if (touched.has(f.name)) continue;
      if (f.kind === "bool") inputs[f.name].checked = !!base[f.name]; else inputs[f.name].value = shownValue(base[f.name]);
    }
  };
  const nameInput = el("input#run-name", { type: "text", value: schema.suggested_name, oninput: () => changed() });
  const formError = el("div.form-error", { role: "alert" });
  const planBox = el("div.plan", el("p.muted", "Check the plan to see whether the run fits, how long an epoch takes, and the lengths of your data."));
  const planButton = el("button#check-plan", { type: "button", onclick: () => plan() }, "Check plan and data");
  const startButton = el("button#start.primary", { type: "button", disabled: true, onclick: () => start() }, "Start training");
  const presetDescription = el("p.help");

  const check = async () => {
    const r = await api("/api/check", { method: "POST", body: { values: values(), preset } });
    for (const [name, box] of Object.entries(warns)) {
      clear(box, (r.warnings[name] || []).map((w) => el("div.warn", w)), r.field === name ? el("div.err", r.error) : null);
      inputs[name].classList.toggle("invalid", r.field === name);
    }
    clear(formError, r.error && !r.field ? r.error : null);
    return r;
  };
  const changed = (name) => {
    if (name) touched.add(name);
    if (planned !== JSON.stringify([values(), preset, nameInput.value])) {
      startButton.disabled = true;
      if (planned) clear(planBox, el("p.muted", "Settings changed: check the plan again before starting."));
      planned = null;
    }
    clearTimeout(timer);
    timer = setTimeout(() => check().catch((e) => notice("error", e.message)), 250);
  };
  const plan = async () => {
    const key = JSON.stringify([values(), preset, nameInput.value]);
    startButton.disabled = true;  // until this plan has worked
    planned = null;
    const r0 = await check();
    if (r0.error) return;
    planButton.disabled = true;
    clear(planBox, el("p.busy", "Planning: reading the model's config and tokenizing the data…"));
    try {
      const r = await api("/api/plan", { method: "POST", body: { values: values(), preset, name: nameInput.value } });
      clear(planBox, r.start_error ? el("div.notice.warning#start-error", r.start_error) : null,
        planView(r, (n) => { inputs.max_length.value = String(n); changed("max_length"); plan(); }));
      planned = key;
      startButton.disabled = !!r.start_error;
    } catch (e) {
      clear(planBox, el("div.notice.error", e.message));
    } finally {
      planButton.disabled = false;
    }
  };
  const start = async () => {
    startButton.disabled = true;
    try {
      const r = await api("/api/runs", { method: "POST", body: { name: nameInput.value, preset, values: values() } });
      UI.pending.push(["info", `started: ${r.command}`]);
      if (r.warning) UI.pending.push(["warning", r.warning]);
      location.hash = `#/run/${encodeURIComponent(r.name)}`;
    } catch (e) {
      notice("error", e.message);
      startButton.disabled = false;
    }
  };

  const fieldRow = (f) => {
    const input = fieldInput(f, () => changed(f.name));
    inputs[f.name] = input;
    warns[f.name] = el("div.messages", { "aria-live": "polite" });
    const upload = ["train_data", "val_data", "test_data"].includes(f.name) ? uploadButton(f, input, changed) : null;
    return el(`div.field${f.kind === "bool" ? ".bool" : ""}`, { "data-field": f.name },
      el("label", { for: input.id }, f.name), el("div.input-line", input, upload),
      el("div.help", f.help, el("span.allowed", ` (${f.allowed}; default ${shownValue(f.default) || "none"})`)), warns[f.name]);
  };
  const group = (name) => schema.fields.filter((f) => f.group === name).map(fieldRow);
  const presetSelect = el("select#preset", { onchange: () => {
    preset = presetSelect.value;
    presetDescription.textContent = schema.presets[preset].description;
    show();
    changed();
  } }, Object.keys(schema.presets).map((p) => el("option", { value: p, selected: p === preset }, p)));

  append(main,
    el("div.toolbar", el("h1", "New run"), el("span.muted", `into ${schema.root}`)),
    schema.running.length ? el("div.notice.warning", `${schema.running.join(", ")} ${schema.running.length > 1 ? "are" : "is"
    } training: a second run shares this machine's CPU and GPU, and both go slower.`) : null,
    el("div.new-run",
      el("form.settings", { onsubmit: (e) => e.preventDefault() },
        el("section.card", el("h2", "Run"),
          el("div.field", el("label", { for: "run-name" }, "run name"), nameInput,
            el("div.help", "The run's folder in the runs folder (letters, digits, . _ -).")),
          el("div.field", el("label", { for: "preset" }, "preset"), presetSelect, presetDescription)),
        el("section.card", el("h2", "The Training Guide's nine settings"), el("div.grid2", group("guide"))),
        el("section.card", el("h2", "Model and data"), group("model and data")),
        el("section.card", el("details", el("summary", "All other settings"), group("more")))),
      el("aside.card.plan-panel", el("h2", "Before you start"), formError,
        el("div.row", planButton, startButton), planBox)));
  presetDescription.textContent = schema.presets[preset].description;
  show();
  check().catch((e) => notice("error", e.message));
};
