// loratune ui: the shared pieces (API calls, live streams, page routing, small DOM and number helpers).
"use strict";

const UI = { pages: {}, cleanup: [], pending: [], openGroups: new Set() };

// Every request that changes something carries this header: a form on another site cannot send it.
async function api(path, { method = "GET", body, raw } = {}) {
  const init = { method, headers: { "X-Loratune": "1" } };
  if (raw !== undefined) init.body = raw;
  else if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const res = await fetch(path, init);
  let data = null;
  try { data = await res.json(); } catch (e) { data = { error: `${res.status} ${res.statusText}` }; }
  if (!res.ok) throw new Error((data && data.error) || `${res.status} ${res.statusText}`);
  return data;
}

// A server-sent event stream, closed when the page changes; EventSource reconnects by itself.
function live(path, onEvent) {
  const source = new EventSource(path);
  source.onmessage = (e) => onEvent(JSON.parse(e.data));
  UI.cleanup.push(() => source.close());
  return source;
}

// Server-sent events from a POST (EventSource only does GET): calls onEvent for each `data:` line.
async function postStream(path, body, onEvent, signal) {
  const res = await fetch(path, {
    method: "POST", signal,
    headers: { "X-Loratune": "1", "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  if (!res.ok) {
    let msg = `${res.status}`;
    try { msg = (await res.json()).error; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const chunk = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of chunk.split("\n")) if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
    }
  }
}

// el("div.card#id", {attrs}, children...): a small DOM builder; strings become text nodes (never HTML).
function el(spec, attrs, ...children) {
  const [, tag, rest] = spec.match(/^([a-z0-9]+)(.*)$/i);
  const node = document.createElement(tag);
  for (const part of rest.match(/[.#][^.#]+/g) || []) {
    if (part[0] === ".") node.classList.add(part.slice(1)); else node.id = part.slice(1);
  }
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs);
    attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "value") node.value = v;
    else if (k === "checked") node.checked = !!v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  return append(node, ...children);
}

function append(node, ...children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function clear(node, ...children) {
  node.replaceChildren();
  return append(node, ...children);
}

const fmt = {
  loss: (v) => (v === null || v === undefined ? "—" : Number(v).toFixed(4)),
  int: (v) => (v === null || v === undefined ? "—" : Math.round(v).toLocaleString("en-US")),
  rate: (v) => (v === null || v === undefined ? "—" : `${Math.round(v).toLocaleString("en-US")}`),
  bytes: (v) => {
    if (v === null || v === undefined) return "—";
    return v >= 2 ** 30 / 4 ? `${(v / 2 ** 30).toFixed(2)} GiB` : `${(v / 2 ** 20).toFixed(0)} MiB`;
  },
  time: (t) => {
    if (!t) return "—";
    const d = new Date(t * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}`;
  },
  seconds: (s) => {
    if (s === null || s === undefined) return "—";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    return h ? `${h}h${String(m).padStart(2, "0")}m` : m ? `${m}m${String(r).padStart(2, "0")}s` : `${r}s`;
  },
  short: (path) => (path ? String(path).split("/").pop() : "—"),
  value: (v) => (v === null || v === undefined ? "—" : typeof v === "object" ? JSON.stringify(v) : String(v)),
};

function badge(state) {
  return el(`span.badge.state-${state}`, state);
}

// A message line at the top of the page (errors, warnings, what was started).
function notice(kind, text) {
  const box = document.getElementById("notices") || document.getElementById("main");
  const line = el(`div.notice.${kind}`, { role: kind === "error" ? "alert" : "status" }, text,
    el("button.close", { title: "dismiss", onclick: () => line.remove() }, "×"));
  box.prepend(line);
  return line;
}

// A name from the address: as typed when it is not valid percent-encoding (a stray "%" must not blank the page).
function decoded(text) {
  try { return decodeURIComponent(text); } catch (e) { return text; }
}

// The Compare page's address for these runs (each name encoded: it may hold spaces or "&").
function compareHash(names) {
  return `#/compare?runs=${[...names].map(encodeURIComponent).join(",")}`;
}

// Routing: #/runs, #/run/NAME, #/new, #/compare?runs=a,b, #/try?run=NAME
function route() {
  for (const stop of UI.cleanup.splice(0)) stop();
  const hash = location.hash.replace(/^#\/?/, "") || "runs";
  const [path, query] = hash.split("?");
  const [page, ...rest] = path.split("/");
  const params = new URLSearchParams(query || "");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  const main = document.getElementById("main");
  clear(main, el("div#notices"));
  for (const [kind, text] of UI.pending.splice(0)) notice(kind, text);
  const render = UI.pages[page] || UI.pages.runs;
  Promise.resolve(render(main, decoded(rest.join("/")), params)).catch((e) => notice("error", e.message));
}
