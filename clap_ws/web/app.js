// The search page: searches, filters and "more like this" go over the WebSocket with the project's own client;
// audio previews and waveform thumbnails are plain GETs on the same origin. The query lives in the URL.
import { ClapClient } from "./clap-ws-client.js";

const $ = (id) => document.getElementById(id);
const PAGE = 15;
const POLL_MS = 2000;
const MESSAGES = {
  busy: "The server is busy right now; try again in a moment.",
  no_library: "No library is loaded. Build one with `clap-ws library build FOLDER --out lib.npz` and start the server with --library lib.npz.",
  unknown_tag: null, // the server's own message names the tag
  connection_lost: "The connection to the server was lost; reconnecting…",
  timeout: "The server did not answer in time; it may be overloaded.",
  text_unavailable: "This server cannot embed text (no tokenizer); search by a sound instead.",
};

const url = new URLSearchParams(location.search);
const state = {
  token: url.get("token") || sessionStorage.getItem("clap-ws-token") || "",
  client: null, info: null, libraries: [], sound: null, soundName: "", like: null,
  tags: new Set(), offset: 0, results: [], selected: -1, playing: -1, history: [], poll: null, searchSeq: 0,
};

// ---- talking to the server ---------------------------------------------------------------------
function authHeaders() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(path) {
  const response = await fetch(path, { headers: authHeaders() });
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const error = new Error(body?.error?.message || `${response.status} ${response.statusText}`);
    error.code = body?.error?.code || String(response.status);
    throw error;
  }
  return body;
}

function withToken(path) {
  return state.token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(state.token)}` : path;
}

async function start() {
  try {
    state.info = await api("/api/info");
  } catch (error) {
    if (error.code === "unauthorized") return askToken(state.token ? "That token was refused; try again." : "");
    return say(`Cannot reach the server: ${error.message}`, true, true);
  }
  $("token-form").hidden = true;
  $("app").hidden = false;
  $("panel").hidden = false;
  $("untrained").hidden = !state.info.untrained;
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  state.client = new ClapClient(withToken(`${scheme}://${location.host}/clap`), { timeoutMs: 60_000 });
  state.client.onStateChange((s) => connection(s === "open"));
  try {
    await state.client.connect();
    connection(true);
    state.libraries = await state.client.libraries();
  } catch (error) {
    return fail(error);
  }
  renderFilters();
  restoreFromUrl();
  renderPanel(state.info);
  state.poll = setInterval(pollInfo, POLL_MS);
  if (!state.libraries.length) return say(MESSAGES.no_library, true);
  await search();
}

function askToken(message) {
  $("app").hidden = true;
  $("token-form").hidden = false;
  $("token-message").textContent = message;
  $("token-message").classList.toggle("error", !!message);
  $("token").focus();
}

function connection(open) {
  const pill = $("connection");
  pill.textContent = open ? "connected" : "connection lost, reconnecting…";
  pill.className = `pill ${open ? "ok" : "bad"}`;
}

// ---- searching ---------------------------------------------------------------------------------
function query() {
  const q = { tags: [...state.tags] };
  const text = $("text").value.trim();
  if (text) q.text = text;
  if (state.like) q.item = { library: state.like.library, id: state.like.id };
  else if (state.sound) { q.audio = state.sound; q.sampleRate = 48000; }
  if ((q.audio || q.item) && q.text) q.alpha = Number($("alpha").value);
  const library = $("library").value;
  if (library) q.library = library;
  const min = $("min-duration").value, max = $("max-duration").value;
  if (min !== "") q.minDuration = Number(min);
  if (max !== "") q.maxDuration = Number(max);
  return q;
}

async function search({ append = false } = {}) {
  if (!state.client) return;
  const seq = ++state.searchSeq;
  saveToUrl();
  $("blend").hidden = !((state.sound || state.like) && $("text").value.trim());
  say(append ? "Loading more…" : "Searching…");
  try {
    const page = await state.client.searchPage({ ...query(), topK: PAGE, offset: append ? state.offset : 0 });
    if (seq !== state.searchSeq) return; // a newer search has started
    state.results = append ? [...state.results, ...page.matches] : page.matches;
    state.offset = page.offset + page.count;
    if (!append) { stop(); state.selected = -1; }
    renderResults(append ? page.matches : state.results, append);
    $("more").hidden = !page.more;
    const what = state.like ? `like ${state.like.path}` : (query().text || state.sound ? "" : "(browsing)");
    say(state.results.length ? `${state.results.length}${page.more ? "+" : ""} sounds ${what}` : "No sounds match these filters.");
  } catch (error) {
    if (seq === state.searchSeq) fail(error);
  }
}

function fail(error) {
  const message = MESSAGES[error.code] || error.message;
  say(message, true);
}

function say(message, isError = false, fatal = false) {
  const target = fatal || $("app").hidden ? $("token-message") : $("status");
  if (fatal) { $("token-form").hidden = false; $("token").hidden = true; }
  target.textContent = message;
  target.classList.toggle("error", isError);
}

// ---- results -----------------------------------------------------------------------------------
function renderResults(items, append) {
  const list = $("results");
  if (!append) list.replaceChildren();
  const start = append ? state.results.length - items.length : 0;
  items.forEach((item, k) => list.append(resultRow(item, start + k)));
}

function resultRow(item, index) {
  const row = $("result-template").content.firstElementChild.cloneNode(true);
  const name = item.path.split("/").pop();
  row.dataset.index = index;
  row.querySelector(".name").textContent = name;
  const bits = [item.tags.length ? item.tags.join(" / ") : null, item.duration != null ? `${item.duration.toFixed(2)} s` : null,
    item.sample_rate ? `${item.sample_rate / 1000} kHz` : null, item.channels ? (item.channels === 1 ? "mono" : `${item.channels} ch`) : null];
  if (state.libraries.length > 1) bits.push(item.library);
  row.querySelector(".meta").textContent = bits.filter(Boolean).join(" · ");
  const score = row.querySelector(".score");
  if (item.score == null) score.hidden = true;
  else {
    score.querySelector(".bar").style.width = `${Math.max(2, Math.round(Math.max(0, item.score) * 100))}%`;
    score.querySelector("span").textContent = item.score.toFixed(3);
  }
  row.querySelector(".play").addEventListener("click", () => { select(index); toggle(index); });
  row.querySelector(".similar").addEventListener("click", () => moreLike(index));
  const link = row.querySelector(".download");
  link.href = withToken(preview(item));
  link.setAttribute("download", name);
  row.addEventListener("click", (event) => { if (event.target === row || event.target.closest(".body")) select(index); });
  drawWave(row.querySelector(".wave"), item);
  return row;
}

function preview(item) {
  return `/audio/${encodeURIComponent(item.library)}/${item.id}`;
}

async function drawWave(canvas, item) {
  try {
    const { peaks } = await api(`/api/waveform/${encodeURIComponent(item.library)}/${item.id}`);
    const g = canvas.getContext("2d");
    const w = canvas.width / Math.max(1, peaks.length), mid = canvas.height / 2;
    g.fillStyle = "#8aa9c8";
    peaks.forEach((p, i) => { const h = Math.max(1, p * mid); g.fillRect(i * w, mid - h, Math.max(1, w - 1), 2 * h); });
  } catch { /* no thumbnail: the row still plays */ }
}

function rows() {
  return [...$("results").children];
}

function select(index) {
  if (index < 0 || index >= state.results.length) return;
  state.selected = index;
  rows().forEach((row, i) => row.classList.toggle("selected", i === index));
  const row = rows()[index];
  row.focus({ preventScroll: true });
  row.scrollIntoView({ block: "nearest" });
}

function toggle(index) {
  const player = $("player");
  if (state.playing === index) return stop();
  stop();
  state.playing = index;
  player.src = withToken(preview(state.results[index]));
  rows()[index]?.classList.add("playing");
  player.play().catch((error) => { if (error.name !== "AbortError") say(`Cannot play this file: ${error.message}`, true); stop(); });
}

function stop() {
  const player = $("player");
  player.pause();
  rows().forEach((row) => row.classList.remove("playing"));
  state.playing = -1;
}

function moreLike(index) {
  const item = state.results[index];
  state.like = { library: item.library, id: item.id, path: item.path };
  state.sound = null;
  $("text").value = "";
  showSound(`like: ${item.path}`);
  search();
}

// ---- the query controls ------------------------------------------------------------------------
function renderFilters() {
  const select = $("library");
  $("library-label").hidden = state.libraries.length < 2;
  for (const lib of state.libraries) select.append(new Option(`${lib.name} (${lib.count})`, lib.name));
  renderTags();
}

function renderTags() {
  const counts = {};
  for (const lib of state.libraries) {
    if ($("library").value && lib.name !== $("library").value) continue;
    for (const [tag, n] of Object.entries(lib.tags)) counts[tag] = (counts[tag] || 0) + n;
  }
  const box = $("tags");
  box.replaceChildren(...Object.entries(counts).sort((a, b) => b[1] - a[1]).slice(0, 60).map(([tag, n]) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = "tag";
    chip.dataset.tag = tag;
    chip.setAttribute("aria-pressed", String(state.tags.has(tag)));
    chip.append(tag, Object.assign(document.createElement("small"), { textContent: n }));
    chip.addEventListener("click", () => {
      if (state.tags.has(tag)) state.tags.delete(tag); else state.tags.add(tag);
      chip.setAttribute("aria-pressed", String(state.tags.has(tag)));
      search();
    });
    return chip;
  }));
}

function showSound(label) {
  $("sound-name").textContent = label;
  $("clear-sound").hidden = !label;
}

async function useFile(file) {
  if (!file) return;
  say(`Decoding ${file.name}…`);
  try {
    const context = new OfflineAudioContext(1, 1, 48000); // decodeAudioData resamples to 48 kHz
    const buffer = await context.decodeAudioData(await file.arrayBuffer());
    const mono = new Float32Array(buffer.length);
    for (let c = 0; c < buffer.numberOfChannels; c++) {
      const data = buffer.getChannelData(c);
      for (let i = 0; i < data.length; i++) mono[i] += data[i] / buffer.numberOfChannels;
    }
    const limit = Math.floor((state.info?.config?.max_seconds ?? 60) * 48000);
    state.sound = mono.length > limit ? mono.subarray(0, limit) : mono;
    state.soundName = file.name;
    state.like = null;
    showSound(`sound: ${file.name}${mono.length > limit ? " (first " + limit / 48000 + " s)" : ""}`);
    await search();
  } catch (error) {
    say(`Your browser cannot decode ${file.name} (${error.message || error.name}); try WAV, FLAC, MP3 or Ogg.`, true);
  }
}

function saveToUrl() {
  const p = new URLSearchParams();
  const q = query();
  if (q.text) p.set("q", q.text);
  if (state.like) p.set("like", `${state.like.library}/${state.like.id}`);
  if (q.tags.length) p.set("tags", q.tags.join(","));
  if (q.library) p.set("library", q.library);
  if (q.minDuration !== undefined) p.set("min_duration", q.minDuration);
  if (q.maxDuration !== undefined) p.set("max_duration", q.maxDuration);
  if (q.alpha !== undefined) p.set("alpha", q.alpha);
  history.replaceState(null, "", `${location.pathname}${p.size ? "?" + p : ""}`);
}

function restoreFromUrl() {
  $("text").value = url.get("q") || "";
  for (const tag of (url.get("tags") || "").split(",").filter(Boolean)) state.tags.add(tag);
  if (url.get("library")) $("library").value = url.get("library");
  $("min-duration").value = url.get("min_duration") || "";
  $("max-duration").value = url.get("max_duration") || "";
  if (url.get("alpha")) $("alpha").value = url.get("alpha");
  const like = /^(.+)\/(\d+)$/.exec(url.get("like") || "");
  if (like) {
    state.like = { library: like[1], id: Number(like[2]), path: `${like[1]} #${like[2]}` };
    showSound(`like: ${state.like.path}`);
  }
  renderTags();
}

// ---- the server panel --------------------------------------------------------------------------
async function pollInfo() {
  if (!state.client?.isOpen) return;
  try { renderPanel(await state.client.info({ timeoutMs: 5000 })); } catch { /* the pill says it */ }
}

function renderPanel(info) {
  const r = info.recent || {};
  const ms = (v) => (v == null ? "–" : `${v.toFixed(0)} ms`);
  const rows = [
    ["model", info.untrained ? "untrained (random weights)" : info.model],
    ["checkpoint", info.checkpoint_sha256 ? info.checkpoint_sha256.slice(0, 12) : "none"],
    ["device", `${info.device} · ${info.precision} · ${info.engine}`],
    ...(info.engine_auto ? [["engine auto", Object.entries(info.engine_auto.ms_per_window)
      .map(([name, v]) => `${name} ${v.toFixed(1)} ms`).join(", ") + " per window"]] : []),
    ["libraries", (info.libraries || []).map((l) => `${l.name} (${l.count})`).join(", ") || "none"],
    ["archives", String(info.archives ?? 0)],
    ["queue", String(info.queue_depth)],
    ["requests/s", r.per_s == null ? "–" : r.per_s.toFixed(2)],
    ["p50 / p95", `${ms(r.p50_ms)} / ${ms(r.p95_ms)}`],
  ];
  $("server").replaceChildren(...rows.flatMap(([k, v]) => [
    Object.assign(document.createElement("dt"), { textContent: k }),
    Object.assign(document.createElement("dd"), { textContent: v })]));
  state.history.push([r.per_s || 0, r.p95_ms || 0]);
  if (state.history.length > 30) state.history.shift();
  drawChart();
}

function drawChart() {
  const canvas = $("chart"), g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  [[0, "#2b6cb0"], [1, "#c05621"]].forEach(([k, color]) => {
    const values = state.history.map((h) => h[k]);
    const top = Math.max(1e-9, ...values);
    g.strokeStyle = color;
    g.beginPath();
    values.forEach((v, i) => {
      const x = (i / 29) * (canvas.width - 2) + 1, y = canvas.height - 2 - (v / top) * (canvas.height - 6);
      if (i) g.lineTo(x, y); else g.moveTo(x, y);
    });
    g.stroke();
  });
}

// ---- wiring ------------------------------------------------------------------------------------
$("search-form").addEventListener("submit", (event) => { event.preventDefault(); search(); });
$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim();
  sessionStorage.setItem("clap-ws-token", state.token);
  start();
});
$("file").addEventListener("change", (event) => useFile(event.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => { event.preventDefault(); drop.classList.remove("over"); useFile(event.dataTransfer.files[0]); });
$("clear-sound").addEventListener("click", () => { state.sound = null; state.like = null; $("file").value = ""; showSound(""); search(); });
$("alpha").addEventListener("change", () => search());
$("library").addEventListener("change", () => { renderTags(); search(); });
for (const id of ["min-duration", "max-duration"]) $(id).addEventListener("change", () => search());
$("more").addEventListener("click", () => search({ append: true }));
$("player").addEventListener("ended", stop);
$("player").addEventListener("error", () => { if (state.playing >= 0) { say("This file could not be played.", true); stop(); } });
document.addEventListener("keydown", (event) => {
  if (event.target.id === "text" && event.key === "ArrowDown" && state.results.length) {
    event.preventDefault();
    return select(0);
  }
  if (event.target.closest?.("input, select, textarea") || $("app").hidden) return;
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    event.preventDefault();
    const step = event.key === "ArrowDown" ? 1 : -1;
    select(Math.min(state.results.length - 1, Math.max(0, state.selected + step)));
  } else if (event.key === " " && state.selected >= 0) {
    event.preventDefault();
    toggle(state.selected);
  } else if (event.key === "Enter" && state.selected >= 0 && !event.target.closest?.("button, a")) {
    event.preventDefault();
    moreLike(state.selected);
  }
});

start();
