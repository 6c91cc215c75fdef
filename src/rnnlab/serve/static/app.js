// The page over the JSON API: /v1/model for the header and the curve, /v1/generate (streamed as server-sent
// events, read with fetch since it is a POST) and /v1/score for the heat map. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_BITS = 8;                 // the heat map's scale: 8 bits or more is the deepest colour
let model = null;
let running = null;                 // the AbortController of the generation in flight

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  return Number(x).toPrecision(digits);
}

function showError(id, message) {
  const box = $(id);
  box.textContent = message || "";
  box.hidden = !message;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return body.error || JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

// --- the model: header facts, side panel, defaults ------------------------------------------------------------

function describe(info) {
  const a = info.architecture;
  const cell = a.cell.toUpperCase();
  const layers = a.num_layers > 1 ? `${a.num_layers}×${a.num_hiddens}` : `${a.num_hiddens}`;
  return `${cell} ${layers}${a.embed_size ? `, embed ${a.embed_size}` : ""}`;
}

function fillModel(info) {
  const per = info.data.token === "char" ? "char" : "token";
  const facts = [
    ["model", describe(info)],
    ["params", Number(info.num_params).toLocaleString()],
    ["corpus", info.data.corpus],
    ["vocab", `${info.vocab.size} ${per}s`],
    ["held-out ppl", info.heldout_perplexity == null ? "–" : fmt(info.heldout_perplexity, 4)],
    [`bits/${per}`, info.heldout_bits_per_token == null ? "–" : fmt(info.heldout_bits_per_token, 4)],
  ];
  const list = $("facts");
  list.replaceChildren();
  for (const [k, v] of facts) {
    const li = el("li", { class: "fact" }, `${k} `);
    li.appendChild(el("b", {}, v));
    list.appendChild(li);
  }
  const kv = $("model-kv");
  const variant = info.architecture.cell_variant === "nn" ? " (torch.nn form)" : "";
  const rows = [["cell", `${info.architecture.cell}${variant}`],
                ["layers × hidden", `${info.architecture.num_layers} × ${info.architecture.num_hiddens}`],
                ["preprocessing", info.data.preprocess], ["epoch", info.epoch ?? "–"],
                ["default temperature", info.default_temperature]];
  for (const [k, v] of rows) { kv.appendChild(el("dt", {}, k)); kv.appendChild(el("dd", {}, String(v))); }
  $("vocab").textContent = info.vocab.tokens.map((t) => (t === "\n" ? "↵" : t === " " ? "␣" : t)).join(" ");

  const lim = info.limits;
  setRange("temperature", { value: info.default_temperature });
  setRange("top_k", { max: Math.min(info.vocab.size, 200) });
  setRange("num_preds", { max: lim.max_new_tokens, value: Math.min(200, lim.max_new_tokens) });
  setRange("num_samples", { max: lim.max_samples });
  $("prompt").value = info.prompts[0] || "";
  drawCurve(info.metrics || []);
}

function setRange(id, { max, value }) {
  const input = $(id);
  if (max !== undefined) input.max = max;
  if (value !== undefined) input.value = value;
  showValue(id);
}

function showValue(id) {
  const v = Number($(id).value);
  const shown = { top_k: v === 0 ? "off" : v, top_p: v >= 1 ? "off" : v.toFixed(2),
                  temperature: v === 0 ? "0 (greedy)" : v.toFixed(2) }[id];
  $(`${id}-v`).textContent = shown ?? v;
}

// --- the perplexity curve (inline SVG) ------------------------------------------------------------------------

function drawCurve(records) {
  const svg = $("curve");
  svg.replaceChildren();
  const W = 320, H = 210, L = 44, R = 10, T = 10, B = 34;
  const series = [["train_ppl", "var(--train)"], ["val_ppl", "var(--val)"]];
  const xs = records.map((r) => r.progress ?? r.epoch);
  const ys = records.flatMap((r) => series.map(([k]) => r[k])).filter((y) => y != null && isFinite(y) && y > 0);
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  if (!records.length || !ys.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no metrics recorded");
    return;
  }
  const x0 = Math.min(0, ...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const log = y1 / y0 > 4;                                  // a log axis when perplexity falls by a lot
  const f = log ? Math.log : (y) => y;
  if (y1 - y0 < 1e-9) { y0 *= 0.9; y1 *= 1.1; }
  const pad = (f(y1) - f(y0)) * 0.08;
  const fy0 = f(y0) - pad, fy1 = f(y1) + pad;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (f(y) - fy0) / (fy1 - fy0)) * (H - T - B);
  // axes, ticks and grid
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#c9ced6" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#c9ced6" });
  for (const t of ticks(y0, y1, log)) {
    add("line", { x1: L, y1: py(t), x2: W - R, y2: py(t), stroke: "#eef0f3" });
    add("text", { x: L - 6, y: py(t) + 4, "text-anchor": "end" }, fmtTick(t));
  }
  for (const t of ticks(x0, x1, false)) {
    add("text", { x: px(t), y: H - B + 15, "text-anchor": "middle" }, fmtTick(t));
  }
  add("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle" }, "epoch");
  add("text", { x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
                transform: `rotate(-90 12 ${(T + H - B) / 2})` }, log ? "perplexity (log)" : "perplexity");
  for (const [key, colour] of series) {
    const pts = records.map((r, i) => [xs[i], r[key]]).filter(([, y]) => y != null && isFinite(y) && y > 0);
    if (!pts.length) continue;
    add("polyline", { class: `line-${key}`, fill: "none", stroke: colour, "stroke-width": 2,
                      "stroke-linejoin": "round", points: pts.map(([x, y]) => `${px(x)},${py(y)}`).join(" ") });
    if (pts.length <= 40) {
      for (const [x, y] of pts) {
        const dot = add("circle", { cx: px(x), cy: py(y), r: 3, fill: colour });
        const title = document.createElementNS(ns, "title");
        title.textContent = `${key === "val_ppl" ? "held-out" : "train"} ${fmt(y, 4)} at epoch ${fmt(x, 3)}`;
        dot.appendChild(title);
      }
    }
  }
}

function ticks(lo, hi, log) {
  if (log) {
    const out = [];
    for (let e = Math.floor(Math.log10(lo)); e <= Math.ceil(Math.log10(hi)); e++) {
      for (const m of [1, 2, 5]) {
        const t = m * 10 ** e;
        if (t >= lo * 0.98 && t <= hi * 1.02) out.push(t);
      }
    }
    return out.length >= 2 ? out : [lo, hi];
  }
  const span = hi - lo || 1, raw = span / 4, mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => span / s <= 5);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(+t.toFixed(10));
  return out;
}

function fmtTick(t) {
  return t >= 1000 ? `${+(t / 1000).toFixed(1)}k` : String(+t.toPrecision(3));
}

// --- generation: server-sent events over fetch ----------------------------------------------------------------

function options() {
  const n = (id) => Number($(id).value);
  return { prompt: $("prompt").value, temperature: n("temperature"), top_k: n("top_k"), top_p: n("top_p"),
           num_preds: n("num_preds"), num_samples: n("num_samples"), seed: n("seed"), stream: true };
}

async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trimStart();
      }
      yield { name, data: data ? JSON.parse(data) : null };
    }
  }
}

function sampleCard(i, n, promptText) {
  const card = el("div", { class: "sample" });
  const head = el("div", { class: "sample-head" });
  head.appendChild(el("span", {}, n > 1 ? `sample ${i + 1} of ${n}` : "sample"));
  const scoreIt = el("button", { class: "link" }, "score this →");
  head.appendChild(scoreIt);
  const out = el("pre", { class: "out live" });
  out.appendChild(el("span", { class: "p" }, promptText));
  const gen = el("span", { class: "g" });
  out.appendChild(gen);
  card.append(head, out);
  scoreIt.addEventListener("click", () => {
    $("score-text").value = out.textContent;
    selectTab("score");
    score();
  });
  return { card, out, gen };
}

async function generate() {
  if (running) return;
  showError("gen-error", "");
  $("gen-note").hidden = true;
  const body = options();
  running = new AbortController();
  $("generate").disabled = true;
  $("stop").hidden = false;
  const started = performance.now();
  let chars = 0, cards = [];
  const status = $("gen-status");
  status.textContent = "starting…";
  try {
    const response = await fetch("/v1/generate", { method: "POST", signal: running.signal,
      headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await apiError(response));
    for await (const ev of events(response)) {
      if (ev.name === "prompt") {
        $("samples").replaceChildren();
        cards = [];
        for (let i = 0; i < ev.data.options.num_samples; i++) {
          const c = sampleCard(i, ev.data.options.num_samples, ev.data.prompt);
          $("samples").appendChild(c.card);
          cards.push(c);
        }
        const unknown = Object.keys(ev.data.unknown || {});
        if (unknown.length) {
          $("gen-note").textContent = `The vocabulary lacks ${unknown.map((c) => JSON.stringify(c)).join(", ")}: ` +
            "the model reads them as <unk>.";
          $("gen-note").hidden = false;
        }
      } else if (ev.name === "piece") {
        cards[ev.data.sample].gen.textContent += ev.data.text;
        chars += ev.data.text.length;
        const s = (performance.now() - started) / 1000;
        status.textContent = `streaming… ${chars} chars, ${Math.round(chars / Math.max(s, 1e-3))} chars/s`;
      } else if (ev.name === "error") {
        throw new Error(ev.data.error);
      } else if (ev.name === "done") {
        const s = (performance.now() - started) / 1000;
        status.textContent = `${chars} chars in ${s.toFixed(2)} s · ${Math.round(chars / Math.max(s, 1e-3))} chars/s`;
      }
    }
  } catch (e) {
    if (e.name === "AbortError") status.textContent = `stopped after ${chars} chars`;
    else { showError("gen-error", e.message); status.textContent = ""; }
  } finally {
    for (const c of cards) c.out.classList.remove("live");
    running = null;
    $("generate").disabled = false;
    $("stop").hidden = true;
  }
}

// --- scoring: the surprisal heat map --------------------------------------------------------------------------

function heatColour(bits) {
  const v = Math.min(Math.max(bits / MAX_BITS, 0), 1);
  return `hsl(${48 - 48 * v}, ${88 + 4 * v}%, ${95 - 42 * v}%)`;
}

async function score() {
  showError("score-error", "");
  const text = $("score-text").value;
  $("score").disabled = true;
  try {
    const response = await fetch("/v1/score", { method: "POST", headers: { "Content-Type": "application/json" },
                                                body: JSON.stringify({ text, top: 5 }) });
    if (!response.ok) throw new Error(await apiError(response));
    const result = await response.json();
    drawHeat(result);
  } catch (e) {
    showError("score-error", e.message);
    $("score-result").hidden = true;
  } finally {
    $("score").disabled = false;
  }
}

function drawHeat({ summary, rows }) {
  const per = model && model.data.token !== "char" ? "token" : "char";
  const stats = [[summary.tokens.toLocaleString(), `${per}s scored`], [fmt(summary.bits_per_token, 4), `bits/${per}`],
                 [fmt(summary.perplexity, 4), "perplexity"],
                 [Math.round(summary.total_bits).toLocaleString(), "bits in all"]];
  const box = $("score-summary");
  box.replaceChildren();
  for (const [v, k] of stats) {
    const s = el("div", { class: "stat" });
    s.append(el("b", {}, v), el("span", {}, k));
    box.appendChild(s);
  }
  const heat = $("heat");
  heat.replaceChildren();
  const joiner = per === "char" ? "" : " ";
  rows.forEach((row, i) => {
    const isNl = row.token === "\n";
    const span = el("span", { class: `c${row.bits == null ? " ctx" : ""}${isNl ? " nl" : ""}` },
                    (i ? joiner : "") + (isNl ? "↵\n" : row.token));
    span.dataset.index = row.index;
    if (row.bits == null) {
      span.style.background = "#eef0f3";
      span.title = `${JSON.stringify(row.token)}: context (the first ${per} is not scored)`;
    } else {
      span.dataset.bits = row.bits.toFixed(3);
      span.style.background = heatColour(row.bits);
      const alts = row.top.map((a) => `${JSON.stringify(a.token)} ${(100 * a.prob).toFixed(1)}%`).join(", ");
      span.title = `${JSON.stringify(row.token)}: ${row.bits.toFixed(2)} bits (P = ${fmt(2 ** -row.bits, 3)})\n` +
                   `likeliest: ${alts}`;
      span.dataset.top = JSON.stringify(row.top);
    }
    heat.appendChild(span);
  });
  const unknown = Object.keys(summary.unknown || {});
  $("score-note").hidden = !unknown.length;
  $("score-note").textContent = unknown.length ? `Not in the vocabulary (read as <unk>): ${unknown.join(" ")}` : "";
  $("score-result").hidden = false;
}

function showTip(event) {
  const span = event.target.closest(".c");
  const tip = $("tip");
  if (!span || span.dataset.bits === undefined) { tip.hidden = true; return; }
  if (span.title) { span.dataset.title = span.title; span.removeAttribute("title"); }
  const bits = Number(span.dataset.bits);
  const token = span.textContent.replace("↵\n", "\n").trim() || span.textContent;
  tip.replaceChildren(el("div", { class: "t" }, `${JSON.stringify(token)}  ${bits.toFixed(2)} bits`),
                      el("div", {}, `P = ${fmt(2 ** -bits, 3)}; the model expected:`));
  const top = JSON.parse(span.dataset.top || "[]");
  const best = Math.max(...top.map((a) => a.prob), 1e-9);
  for (const a of top) {
    const row = el("div", { class: "alt" });
    const bar = el("i");
    bar.style.width = `${Math.max(3, (100 * a.prob) / best)}%`;
    row.append(el("span", {}, JSON.stringify(a.token)), el("span", {}),
               el("span", {}, `${(100 * a.prob).toFixed(1)}%`));
    row.children[1].appendChild(bar);
    tip.appendChild(row);
  }
  tip.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - tip.offsetWidth - 8);
  const y = event.clientY + 18 + tip.offsetHeight > window.innerHeight ? event.clientY - tip.offsetHeight - 10
                                                                     : event.clientY + 18;
  tip.style.left = `${x}px`;
  tip.style.top = `${y}px`;
}

// --- tabs and wiring ------------------------------------------------------------------------------------------

function selectTab(name) {
  for (const tab of document.querySelectorAll(".tab")) {
    tab.setAttribute("aria-selected", String(tab.dataset.view === name));
    $(`view-${tab.dataset.view}`).hidden = tab.dataset.view !== name;
  }
  if (name === "score" && !$("score-text").value) {
    const last = document.querySelector("#samples .out");
    $("score-text").value = last ? last.textContent : $("prompt").value;
  }
}

async function init() {
  for (const id of ["temperature", "top_k", "top_p", "num_preds", "num_samples"]) {
    $(id).addEventListener("input", () => showValue(id));
    showValue(id);
  }
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => selectTab(tab.dataset.view));
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => running && running.abort());
  $("reseed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); });
  $("score").addEventListener("click", score);
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) generate(); });
  $("score-text").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) score(); });
  const stops = [0, 0.25, 0.5, 0.75, 1].map((v) => `${heatColour(v * MAX_BITS)} ${100 * v}%`);
  $("legend-bar").style.background = `linear-gradient(to right, ${stops.join(", ")})`;
  $("legend-max").textContent = `${MAX_BITS}+ bits`;
  $("heat").addEventListener("mousemove", showTip);
  $("heat").addEventListener("mouseleave", () => { $("tip").hidden = true; });
  try {
    const response = await fetch("/v1/model");
    if (!response.ok) throw new Error(await apiError(response));
    model = await response.json();
    fillModel(model);
    document.body.dataset.ready = "true";
  } catch (e) {
    showError("gen-error", `could not read the model: ${e.message}`);
  }
}

init();
