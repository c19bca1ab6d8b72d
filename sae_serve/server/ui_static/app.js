// sae_serve feature explorer and playground. Plain JS, no build step, nothing fetched but this server.
// The page itself is public; every /v1 call sends the key typed in the header (kept in localStorage).
"use strict";

const $ = (sel) => document.querySelector(sel);
const KEY_STORE = "sae_serve_api_key";
const state = { model: null, saes: [], sae: null, feature: null };

// ---- HTTP ----------------------------------------------------------------------------------------
function headers(json) {
  const h = json ? { "content-type": "application/json" } : {};
  const key = localStorage.getItem(KEY_STORE);
  if (key) h.authorization = "Bearer " + key;
  return h;
}

class ApiError extends Error {}

// The server's own error text: vLLM/sae_serve answer {"error": {"message", "param"}}.
async function errorOf(resp) {
  let text = await resp.text();
  try {
    const err = JSON.parse(text).error;
    text = typeof err === "string" ? err : err.message;
  } catch (_) { /* not JSON: keep the text */ }
  if (resp.status === 401) text += " (enter the server's API key at the top right)";
  return new ApiError(`HTTP ${resp.status}: ${text}`);
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(false) });
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

// POST a streaming completion; calls onEvent(parsed SSE data) per event.
async function stream(body, onEvent) {
  const resp = await fetch("/v1/completions", { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!resp.ok) throw await errorOf(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (!data || data === "[DONE]") continue;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(`stream ended with an error: ${parsed.error.message}`);
      onEvent(parsed);
    }
  }
}

function showError(err) {
  const box = $("#error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
  if (err && !(err instanceof ApiError)) console.warn(err);
}

// Runs an async UI action, showing its failure in the error box.
function guarded(fn) {
  return async (...args) => {
    try { showError(null); await fn(...args); } catch (err) { showError(err); }
  };
}

// ---- small DOM helpers ---------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "on") Object.entries(v).forEach(([ev, f]) => node.addEventListener(ev, f));
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

const fmt = (x, digits = 3) => (x == null ? "–" : Number(x).toPrecision(digits));
const tags = (list) => el("span", {}, ...(list || []).map((t) => el("span", { class: "tag" }, t)));
// Orange with opacity by activation / max: the Neuronpedia-style highlight.
const heat = (ratio) => `background: rgba(255, 140, 0, ${Math.max(0, Math.min(1, ratio)).toFixed(2)})`;

// ---- views ---------------------------------------------------------------------------------------
function route() {
  const [view, sae, feature] = (location.hash.slice(1) || "explorer").split("/");
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== "view-" + view; });
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  if (view === "feature" && sae && feature) guarded(showFeature)(decodeURIComponent(sae), decodeURIComponent(feature));
  if (view === "watchlist") guarded(pollMetrics)();
}

async function loadSaes() {
  const models = await getJSON("/v1/models");
  state.model = models.data[0].id;
  state.saes = (await getJSON("/v1/saes")).data;
  const select = $("#sae");
  select.replaceChildren(...state.saes.map((s) => el("option", { value: s.name }, s.name)));
  state.sae = state.saes[0]?.name ?? null;
  await onSaeChange();
}

async function onSaeChange() {
  state.sae = $("#sae").value;
  const sae = state.saes.find((s) => s.name === state.sae);
  if (!sae) return;
  $("#sae-info").textContent = `${sae.name}: ${sae.architecture}, ${sae.d_sae} features at layer ${sae.hook_layer}` +
    ` (${sae.hook_point}) of ${sae.model_name || state.model}; watching ${sae.watchlist.length} features.`;
  $("#labels").replaceChildren(...Object.keys(sae.labelled_features).map((l) => el("option", { value: l })));
  await search();
}

// ---- explorer ------------------------------------------------------------------------------------
function featureRow(f, extra = []) {
  return el("tr", { "data-feature": f.feature, on: { click: () => { location.hash = `feature/${state.sae}/${f.feature}`; } } },
    el("td", {}, f.feature), ...extra, el("td", {}, f.label ?? ""), el("td", {}, tags(f.tags)),
    ...(extra.length ? [] : [el("td", {}, fmt(f.max_activation)), el("td", {}, fmt(f.density, 2)),
      el("td", { class: "muted" }, (f.description || "").slice(0, 90))]));
}

async function search() {
  const params = new URLSearchParams({ q: $("#search-q").value, limit: "100" });
  if ($("#search-tag").value) params.set("tag", $("#search-tag").value);
  const found = await getJSON(`/v1/features/${encodeURIComponent(state.sae)}?${params}`);
  const tagSelect = $("#search-tag");
  if (tagSelect.options.length === 1) tagSelect.append(...found.tags.map((t) => el("option", { value: t }, t)));
  $("#search-count").textContent = `${found.total} features match` + (found.total > found.data.length ? `, first ${found.data.length} shown` : "");
  $("#search-results tbody").replaceChildren(...found.data.map((f) => featureRow(f)));
}

// Mean activation of each feature over a text set's tokens, and its peak (top 32 per token are read).
async function meanAndPeak(texts) {
  const total = new Map(), peak = new Map();
  let count = 0;
  for (const text of texts) {
    await stream({ model: state.model, prompt: text, max_tokens: 1, temperature: 0, stream: true,
      return_features: { sae: state.sae, top_k: 32 } }, (ev) => {
      for (const tok of ev.sae?.features?.tokens || []) {
        count += 1;
        for (const f of tok.features) {
          total.set(f.feature, (total.get(f.feature) || 0) + f.activation);
          peak.set(f.feature, Math.max(peak.get(f.feature) || 0, f.activation));
        }
      }
    });
  }
  return { mean: (f) => (total.get(f) || 0) / Math.max(count, 1), peak };
}

async function contrastive() {
  const split = (id) => $(id).value.split(/\n\s*\n/).map((t) => t.trim()).filter(Boolean);
  const [pos, neg] = [await meanAndPeak(split("#contrast-pos")), await meanAndPeak(split("#contrast-neg"))];
  const features = new Set([...pos.peak.keys(), ...neg.peak.keys()]);
  const scored = [...features].map((f) => ({
    feature: f, score: (pos.mean(f) - neg.mean(f)) / Math.max(pos.peak.get(f) || 0, neg.peak.get(f) || 0, 1e-6) }));
  scored.sort((a, b) => b.score - a.score);
  const rows = [];
  for (const { feature, score } of scored.slice(0, 10)) {
    const card = await getJSON(`/v1/features/${encodeURIComponent(state.sae)}/${feature}`);
    rows.push(featureRow(card, [el("td", {}, score.toFixed(3))]));
  }
  $("#contrast-results tbody").replaceChildren(...rows);
}

// ---- feature page --------------------------------------------------------------------------------
// One line per example: newlines shown as ↵ so the highlighted token stays in its row.
const oneLine = (s) => s.replace(/\n/g, "↵");
function exampleLine(ex, max, prefix) {
  return el("div", {}, el("span", { class: "act" }, prefix ?? ex.activation.toFixed(2)), oneLine(ex.before),
    el("mark", { style: heat(ex.activation / max), title: `activation ${ex.activation}` }, oneLine(ex.token)),
    oneLine(ex.after));
}

async function showFeature(sae, ref) {
  const card = await getJSON(`/v1/features/${encodeURIComponent(sae)}/${encodeURIComponent(ref)}`);
  const extras = await getJSON(`/v1/features/${encodeURIComponent(sae)}/${card.feature}/examples`);
  state.feature = card;
  $("#feature-title").textContent = `${sae} feature ${card.feature}` + (card.label ? `: ${card.label}` : "");
  const checked = card.precision == null ? "not checked" :
    `precision ${fmt(card.precision, 2)}, recall ${fmt(card.recall, 2)} on ${card.checked_texts} held-out texts`;
  $("#feature-card").replaceChildren(el("table", { class: "features" },
    ...[["max activation", fmt(card.max_activation, 4)], ["density", fmt(card.density, 3)], ["tags", tags(card.tags)],
      ["label check", checked], ["description", card.description || "–"]]
      .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))));
  $("#feature-steer").hidden = false;
  const max = card.max_activation || 1;
  const none = (what) => el("p", { class: "muted" }, `This SAE ships no ${what} (examples.json.gz from sae-serve calibrate).`);
  $("#feature-examples").replaceChildren(...(extras.examples.length ? extras.examples.map((ex) => exampleLine(ex, max))
    : [none("top examples")]));
  $("#feature-quantiles").replaceChildren(...(extras.quantile_examples.length
    ? extras.quantile_examples.map((ex) => exampleLine(ex, max, ex.interval)) : [none("examples by interval")]));
  $("#feature-promoted").replaceChildren(extras.promoted_tokens.length
    ? el("span", {}, ...extras.promoted_tokens.map((t) => el("code", { class: "tag" }, JSON.stringify(t))))
    : none("promoted tokens"));
  await showHistogram(sae, card);
}

// Calibration stores no histogram; a watched feature has a live one in /metrics (served traffic).
async function showHistogram(sae, card) {
  const box = $("#feature-histogram");
  const buckets = card.label ? (await scrapeMetrics()).buckets.filter((b) => b.sae === sae && b.feature === card.label) : [];
  if (!buckets.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No histogram: features.json stores none, and this feature is " +
      "not on the watchlist (watched features get a live histogram of served traffic here). The examples by " +
      "activation interval below show its range."));
    return;
  }
  buckets.sort((a, b) => a.le - b.le);
  const counts = buckets.map((b, i) => b.value - (i ? buckets[i - 1].value : 0));
  const top = Math.max(...counts, 1);
  box.replaceChildren(el("p", { class: "muted" }, "Live, from /metrics: active tokens of served requests by activation."),
    el("div", { class: "hist" }, ...counts.map((c) => el("div", { style: `height: ${(100 * c) / top}%`, title: c }))),
    el("div", { class: "hist-labels" }, ...buckets.map((b) => el("span", {}, "≤" + b.le))));
}

// ---- playground ----------------------------------------------------------------------------------
function addIntervention(feature = "", multiple = 1) {
  const number = el("input", { type: "number", step: "0.1", value: multiple, class: "strength", style: "width: 5em" });
  const slider = el("input", { type: "range", min: "-4", max: "4", step: "0.1", value: multiple });
  slider.addEventListener("input", () => { number.value = slider.value; });
  number.addEventListener("input", () => { slider.value = number.value; });
  const row = el("div", { class: "intervention" },
    el("label", {}, "feature ", el("input", { class: "feature", list: "labels", value: feature, size: 18 })),
    el("label", {}, "clamp to "), slider, number, el("span", {}, "× max activation"),
    el("button", { type: "button", on: { click: () => row.remove() } }, "remove"));
  $("#interventions").append(row);
}

// A feature typed as digits is an index, anything else a label (as the API reads it).
const ref = (text) => (/^\d+$/.test(text.trim()) ? Number(text) : text.trim());

function requestBody(steered) {
  const body = { model: state.model, prompt: $("#prompt").value, max_tokens: Number($("#max-tokens").value),
    temperature: 0, stream: true };
  if (!steered) return body;
  const rows = [...document.querySelectorAll(".intervention")];
  const interventions = rows.map((r) => ({ sae: state.sae, feature: ref(r.querySelector(".feature").value),
    mode: "clamp", multiple_of_max: Number(r.querySelector(".strength").value) }));
  const extra = $("#heatmap-extra").value.split(",").map((s) => s.trim()).filter(Boolean).map(ref);
  const shown = [...new Set([...interventions.map((i) => i.feature), ...extra])];
  if (interventions.length) body.steering = { interventions };
  if (shown.length) body.return_features = { sae: state.sae, features: shown };
  return body;
}

function showCopy() {
  const body = state.lastBody;
  if (!body) return;
  const json = JSON.stringify(body);
  const key = localStorage.getItem(KEY_STORE) ? " -H 'authorization: Bearer YOUR_KEY'" : "";
  const { model, prompt, ...extra } = body;
  const text = {
    json: JSON.stringify(body, null, 1),
    curl: `curl -sN ${location.origin}/v1/completions -H 'content-type: application/json'${key} -d '${json.replace(/'/g, "'\\''")}'`,
    python: [
      "import json",
      "from openai import OpenAI",
      `client = OpenAI(base_url="${location.origin}/v1", api_key="YOUR_KEY")`,
      `body = json.loads(${JSON.stringify(JSON.stringify(extra))})`,
      "steer = {k: body.pop(k) for k in ('steering', 'return_features') if k in body}",
      `for chunk in client.completions.create(model=${JSON.stringify(model)}, prompt=${JSON.stringify(prompt)}, **body, extra_body=steer):`,
      "    print(chunk.choices[0].text, end='', flush=True)",
    ].join("\n"),
  }[$("#copy-kind").value];
  $("#copy-box").textContent = text;
}

async function promptTokens(prompt) {
  const resp = await fetch("/tokenize", { method: "POST", headers: headers(true),
    body: JSON.stringify({ model: state.model, prompt, return_token_strs: true }) });
  if (!resp.ok) return null;  // older vLLM: the heatmap labels prompt tokens by position
  return ((await resp.json()).token_strs || []).map((t) => t.replace(/Ġ/g, " ").replace(/Ċ/g, "↵"));
}

async function generate() {
  const plain = requestBody(false), steered = requestBody(true);
  state.lastBody = steered;
  showCopy();
  $("#out-plain").textContent = $("#out-steered").textContent = "";
  const started = performance.now();
  $("#status").textContent = "generating…";
  const generated = [], activations = new Map();  // position -> [{feature, label, activation}]
  const prompt = promptTokens(plain.prompt);
  await Promise.all([
    stream(plain, (ev) => { $("#out-plain").textContent += ev.choices[0]?.text ?? ""; }),
    stream(steered, (ev) => {
      const text = ev.choices[0]?.text ?? "";
      if (text) generated.push(text);
      $("#out-steered").textContent += text;
      for (const tok of ev.sae?.features?.tokens || []) activations.set(tok.position, tok.features);
      if (activations.size) drawHeatmap(generated, activations, null);
    }),
  ]);
  if (activations.size) drawHeatmap(generated, activations, await prompt);
  $("#status").textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
}

// Readout positions cover the prompt and then each generated token fed back (the last one never is).
function drawHeatmap(generated, activations, promptStrs) {
  const positions = [...activations.keys()].sort((a, b) => a - b);
  const nPrompt = promptStrs ? promptStrs.length : Math.max(positions.length - Math.max(generated.length - 1, 0), 0);
  const text = (p) => (p < nPrompt ? (promptStrs ? promptStrs[p] : `#${p}`) : generated[p - nPrompt] ?? `#${p}`);
  const features = activations.get(positions[0]);
  const sae = state.saes.find((s) => s.name === state.sae);
  const rows = features.map((f, i) => {
    const max = maxOf(sae, f.feature);
    return el("tr", {}, el("th", {}, f.label ?? f.feature),
      ...positions.map((p) => {
        const a = activations.get(p)[i]?.activation ?? 0;
        return el("td", { style: heat(a / max), title: `${text(p)}: ${a}`, class: p < nPrompt ? "prompt" : "" }, text(p));
      }));
  });
  $("#heatmap").replaceChildren(el("table", {}, ...rows),
    el("p", { class: "muted" }, "Colour: activation / the feature's max activation. Prompt tokens first."));
}

const maxCache = new Map();
function maxOf(sae, feature) {
  const key = `${sae.name}/${feature}`;
  if (!maxCache.has(key)) {
    maxCache.set(key, 1);
    getJSON(`/v1/features/${encodeURIComponent(sae.name)}/${feature}`).then((c) => maxCache.set(key, c.max_activation || 1),
      () => {});
  }
  return maxCache.get(key);
}

// ---- watchlist -----------------------------------------------------------------------------------
const SAMPLE = /^(sae_serve_feature_(?:tokens_total|fired_tokens_total|activation_bucket))\{([^}]*)\} ([0-9.eE+-]+|NaN)/;

async function scrapeMetrics() {
  const resp = await fetch("/metrics", { headers: headers(false) });
  if (!resp.ok) throw await errorOf(resp);
  const out = { tokens: new Map(), fired: new Map(), buckets: [] };
  for (const line of (await resp.text()).split("\n")) {
    const m = SAMPLE.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries([...m[2].matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]));
    const key = `${labels.sae}\u0000${labels.feature}`;
    const value = Number(m[3]);
    if (m[1] === "sae_serve_feature_activation_bucket") {
      out.buckets.push({ sae: labels.sae, feature: labels.feature, le: labels.le === "+Inf" ? Infinity : Number(labels.le), value });
    } else {
      // Several vLLM API processes or workers may each export the series: sum them.
      const map = m[1] === "sae_serve_feature_tokens_total" ? out.tokens : out.fired;
      map.set(key, (map.get(key) || 0) + value);
    }
  }
  return out;
}

let lastScrape = null;
async function pollMetrics() {
  const now = performance.now(), scrape = await scrapeMetrics();
  const rate = (f, t) => (t > 0 ? (100 * f / t).toFixed(2) + " %" : "–");
  const rows = [...scrape.tokens.keys()].sort().map((key) => {
    const [sae, feature] = key.split("\u0000");
    const tokens = scrape.tokens.get(key), fired = scrape.fired.get(key) || 0;
    const before = lastScrape ? { t: lastScrape.scrape.tokens.get(key) || 0, f: lastScrape.scrape.fired.get(key) || 0 } : null;
    const dt = before ? (now - lastScrape.now) / 1000 : 0;
    return el("tr", { "data-feature": feature }, el("td", {}, sae), el("td", {}, feature), el("td", {}, tokens),
      el("td", {}, fired), el("td", {}, rate(fired, tokens)),
      el("td", {}, before ? rate(fired - before.f, tokens - before.t) : "–"),
      el("td", {}, before && dt > 0 ? ((tokens - before.t) / dt).toFixed(1) : "–"));
  });
  $("#watch-table tbody").replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No watched features in /metrics."))]));
  lastScrape = { now, scrape };
}

// ---- wiring --------------------------------------------------------------------------------------
function init() {
  const keyInput = $("#api-key");
  keyInput.value = localStorage.getItem(KEY_STORE) || "";
  keyInput.addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, keyInput.value);
    guarded(loadSaes)();
  });
  $("#sae").addEventListener("change", guarded(onSaeChange));
  $("#search-form").addEventListener("submit", (e) => { e.preventDefault(); guarded(search)(); });
  $("#search-tag").addEventListener("change", guarded(search));
  $("#contrast-run").addEventListener("click", guarded(contrastive));
  $("#feature-steer").addEventListener("click", () => {
    $("#interventions").replaceChildren();
    addIntervention(state.feature.label ?? String(state.feature.feature), 1);
    location.hash = "playground";
  });
  $("#add-intervention").addEventListener("click", () => addIntervention());
  $("#run").addEventListener("click", guarded(async () => {
    try { await generate(); } catch (err) { $("#status").textContent = "failed"; throw err; }
  }));
  $("#copy-kind").addEventListener("change", showCopy);
  $("#copy").addEventListener("click", () => navigator.clipboard?.writeText($("#copy-box").textContent).catch(() => {}));
  addIntervention("non-english", 1);
  window.addEventListener("hashchange", route);
  setInterval(() => { if (!$("#view-watchlist").hidden) guarded(pollMetrics)(); }, 2000);
  guarded(async () => { await loadSaes(); route(); })();
}

init();
