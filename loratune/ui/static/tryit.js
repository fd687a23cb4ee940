// Try it: a prompt or a conversation answered by the fine-tuned model and the base model side by side, streaming.
"use strict";

UI.pages.try = async (main, _, params) => {
  const runs = (await api("/api/runs")).runs.filter((r) => r.exists);
  let run = params.get("run") || (runs.find((r) => r.state === "done") || runs[0] || {}).name;
  const history = { "fine-tuned": [], base: [] };
  const columns = { "fine-tuned": el("div.conversation#answer-tuned"), base: el("div.conversation#answer-base") };
  const runSelect = el("select#try-run", { onchange: () => (location.hash = `#/try?run=${encodeURIComponent(runSelect.value)}`) },
    runs.map((r) => el("option", { value: r.name, selected: r.name === run }, r.name)));
  const adapterSelect = el("select#try-adapter");
  const conversation = el("input#try-chat", { type: "checkbox", checked: true });
  const maxTokens = el("input#try-max", { type: "number", min: 1, max: 2048, value: 128 });
  const temperature = el("input#try-temperature", { type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const message = el("textarea#try-message", { rows: 3, placeholder: "Write a prompt…" });
  const ask = el("button#ask.primary", { type: "button", onclick: () => send() }, "Ask both");
  const reset = el("button", { type: "button", onclick: () => {
    history["fine-tuned"] = []; history.base = [];
    clear(columns["fine-tuned"]); clear(columns.base);
  } }, "New conversation");
  let controller = null;
  append(main, el("div.toolbar", el("h1", "Try it")),
    el("section.card", el("div.row",
      el("label", "run ", runSelect), el("label", "adapter ", adapterSelect),
      el("label", conversation, " keep the conversation"), el("label", "max new tokens ", maxTokens),
      el("label", "temperature ", temperature))),
    el("div.side-by-side",
      el("section.card", el("h2", "Fine-tuned (base + adapter)"), columns["fine-tuned"]),
      el("section.card", el("h2", "Base model"), columns.base)),
    el("section.card", message, el("div.row", ask, reset)));
  if (!run) {
    notice("info", "No run to try yet.");
    ask.disabled = true;
    return;
  }
  const d = await api(`/api/runs/${encodeURIComponent(run)}`);
  const choices = [...d.adapters.map((a) => [a, a === "adapter" ? "best (adapter/)" : "last (last/)"]),
    ...d.checkpoints.map((c) => [c.name, `checkpoint ${checkpointWhen(c)}`])];
  clear(adapterSelect, choices.map(([v, label]) => el("option", { value: v }, label)));
  if (!choices.length) { notice("warning", `${run} has no adapter or checkpoint yet.`); ask.disabled = true; }
  message.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(); });
  UI.cleanup.push(() => controller && controller.abort());

  async function send() {
    const text = message.value.trim();
    if (!text) return;
    if (!conversation.checked) reset.click();
    const bubbles = {};
    for (const side of Object.keys(columns)) {
      append(columns[side], el("div.turn.user", text));
      bubbles[side] = el("div.turn.model.streaming");
      append(columns[side], bubbles[side]);
    }
    ask.disabled = true;
    controller = new AbortController();
    const body = { run, adapter: adapterSelect.value, message: text, history,
      max_new_tokens: Number(maxTokens.value), temperature: Number(temperature.value) };
    try {
      await postStream("/api/try", body, (m) => {
        if (m.error) notice("error", m.error);
        if (m.side && m.text !== undefined && !m.done) bubbles[m.side].textContent += m.text;
        if (m.side && m.done) {
          bubbles[m.side].textContent = m.text;
          bubbles[m.side].classList.remove("streaming");
          history[m.side].push({ role: "user", content: text }, { role: "assistant", content: m.text });
        }
      }, controller.signal);
      message.value = "";
    } catch (e) {
      if (e.name !== "AbortError") notice("error", e.message);
    } finally {
      ask.disabled = false;
      for (const b of Object.values(bubbles)) b.classList.remove("streaming");
    }
  }
};
