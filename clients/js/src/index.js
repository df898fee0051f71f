// clap-ws-client: one persistent, pipelined connection per clap-ws server, and pools of them.
//
// Works in Node >= 18 (with the `ws` package, or Node's own WebSocket where it has one) and in
// browsers (native WebSocket), from one code base. The server answers requests on a connection in
// the order they arrived, so the client keeps a FIFO of pending requests: each reply settles the
// oldest one (JSON replies also carry the request id, which is checked). A request that times out
// keeps its place in the FIFO, so the late reply is recognised and dropped.
//
// Failures are never silent and never hang: every promise settles - with the result, a ClapError
// carrying the server's error code, a TimeoutError, or a ConnectionError when the connection
// drops or close() is called.

const DIM = 512;

// ---- errors -------------------------------------------------------------------------------
export class ClapError extends Error {
  constructor(message, code = "error", requestId = undefined) {
    super(message);
    this.name = "ClapError";
    this.code = code;
    this.requestId = requestId;
  }
}

export class TimeoutError extends ClapError {
  constructor(message, requestId) {
    super(message, "timeout", requestId);
    this.name = "TimeoutError";
  }
}

export class ConnectionError extends ClapError {
  constructor(message, code = "connection_lost") {
    super(message, code);
    this.name = "ConnectionError";
  }
}

// ---- helpers ------------------------------------------------------------------------------
const isNode = typeof process !== "undefined" && !!process.versions?.node;

async function webSocketClass(explicit) {
  if (explicit) return explicit;
  if (isNode) {
    // The `ws` package: it exposes ping/pong and large-frame settings that Node's WebSocket lacks.
    try {
      return (await import("ws")).default;
    } catch {
      /* fall through to a global WebSocket */
    }
  }
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  throw new ClapError("no WebSocket implementation: install the `ws` package", "no_websocket");
}

function searchMessage(query) {
  const message = { op: "search", top_k: query.topK ?? 10, ...audioFields(query) };
  if (query.text) message.text = query.text;
  if (query.audio) message.audio_buffer = base64(toFloat32(query.audio));
  if (query.embedding) message.embedding = plainVector(query.embedding);
  if (query.item) message.item = { library: query.item.library, id: query.item.id };
  if (query.alpha !== undefined) message.alpha = query.alpha;
  if (query.tags?.length) message.tags = query.tags;
  if (query.library) message.library = query.library;
  if (query.offset) message.offset = query.offset;
  if (query.minScore !== undefined) message.min_score = query.minScore;
  if (query.minDuration !== undefined) message.min_duration = query.minDuration;
  if (query.maxDuration !== undefined) message.max_duration = query.maxDuration;
  return message;
}

function toFloat32(audio) {
  if (audio instanceof Float32Array) return audio;
  if (ArrayBuffer.isView(audio) || Array.isArray(audio)) return Float32Array.from(audio);
  throw new TypeError("audio must be a Float32Array (or an array of numbers)");
}

function littleEndianBytes(f32) {
  const bytes = new Uint8Array(f32.buffer, f32.byteOffset, f32.byteLength);
  if (new Uint8Array(new Uint16Array([1]).buffer)[0] === 1) return bytes; // little-endian host
  const copy = new Uint8Array(bytes); // rare big-endian host: swap each float
  for (let i = 0; i < copy.length; i += 4) copy.subarray(i, i + 4).reverse();
  return copy;
}

function base64(f32) {
  const bytes = littleEndianBytes(f32);
  if (typeof Buffer !== "undefined") return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

const vec = (list) => Float32Array.from(list);
const plainVector = (v) => (v instanceof Float32Array ? Array.from(v) : v);

// Options of the public API (camelCase) -> protocol fields (snake_case).
function audioFields(opts = {}) {
  const out = {};
  if (opts.sampleRate !== undefined) out.sample_rate = opts.sampleRate;
  if (opts.channels !== undefined) out.channels = opts.channels;
  if (opts.normalize !== undefined) out.normalize = opts.normalize;
  if (opts.longClip !== undefined) out.long_clip = opts.longClip;
  return out;
}

function scoringFields(opts = {}) {
  const out = {};
  if (opts.prompts) out.prompts = opts.prompts;
  if (opts.probs) out.probs = true;
  if (opts.references) out.references = opts.references.map(plainVector);
  if (opts.topK) out.top_k = opts.topK;
  if (opts.library) out.library = opts.library;
  if (opts.tags) out.tags = opts.tags;
  if (opts.archive) out.archive = opts.archive;
  if (opts.k !== undefined) out.k = opts.k;
  if (opts.archiveAdd) out.archive_add = true;
  if (opts.ids) out.ids = opts.ids;
  if (opts.descriptor) out.descriptor = true;
  return out;
}

const hasScoring = (opts = {}) => Object.keys(scoringFields(opts)).length > 0;

function itemsOf(reply, index, batch) {
  const pick = (key) => (reply[key] === undefined ? undefined : batch ? reply[key][index] : reply[key]);
  const out = {};
  for (const [key, name] of [["similarity", "similarity"], ["probs", "probs"], ["reference_similarity", "referenceSimilarity"],
    ["matches", "matches"], ["novelty", "novelty"], ["archive_count", "archiveCount"], ["behavior_descriptor", "behaviorDescriptor"],
    ["projection_version", "projectionVersion"], ["cached", "cached"], ["warnings", "warnings"]]) {
    const value = pick(key);
    if (value !== undefined) out[name] = value;
  }
  return out;
}

const timing = (reply) => ({ seconds: reply.time, queueMs: reply.queue_ms, modelMs: reply.model_ms });

// ---- one connection -----------------------------------------------------------------------------
export class ClapClient {
  /**
   * @param {string} url e.g. "ws://127.0.0.1:32051/clap"
   * @param {object} [options] timeoutMs, reconnect, backoff {initialMs, maxMs, factor}, binaryReplies, WebSocket
   */
  constructor(url, options = {}) {
    this.url = url;
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.reconnect = options.reconnect ?? true;
    this.backoff = { initialMs: 100, maxMs: 5_000, factor: 2, ...(options.backoff || {}) };
    this.binaryReplies = options.binaryReplies ?? true;
    this._WebSocketOption = options.WebSocket;
    this._ws = null;
    this._fifo = []; // pending requests, in send order
    this._nextId = 1;
    this._closed = false;
    this._attempt = 0;
    this._opening = null;
    this._reconnectTimer = null;
    this._listeners = new Set();
    this._outstanding = 0;
  }

  /** True while the connection is open. */
  get isOpen() {
    return !!this._ws && this._ws.readyState === 1;
  }

  /** Requests made and not yet settled (counted from the call, before the send). */
  get pending() {
    return this._outstanding;
  }

  /** Subscribe to "open" / "close" events; returns an unsubscribe function. */
  onStateChange(fn) {
    this._listeners.add(fn);
    return () => this._listeners.delete(fn);
  }

  _emit(state, detail) {
    for (const fn of this._listeners) {
      try {
        fn(state, detail);
      } catch {
        /* a listener's bug must not break the client */
      }
    }
  }

  /** Open the connection (also done lazily by the first request). */
  connect() {
    if (this._closed) return Promise.reject(new ConnectionError("client is closed", "closed"));
    if (this.isOpen) return Promise.resolve();
    if (!this._opening) {
      this._opening = this._open().finally(() => {
        this._opening = null;
      });
    }
    return this._opening;
  }

  async _open() {
    const WS = (this._WebSocket ??= await webSocketClass(this._WebSocketOption));
    return new Promise((resolve, reject) => {
      const ws = isNode && WS.name === "WebSocket" && WS.prototype?.ping
        ? new WS(this.url, { maxPayload: 256 * 1024 * 1024 })
        : new WS(this.url);
      ws.binaryType = "arraybuffer";
      let opened = false;
      ws.onopen = () => {
        opened = true;
        this._ws = ws;
        this._attempt = 0;
        this._emit("open");
        resolve();
      };
      ws.onmessage = (event) => this._onMessage(event.data);
      ws.onerror = () => {
        /* onclose follows with the details */
      };
      ws.onclose = (event) => {
        if (this._ws === ws) this._ws = null;
        const reason = `connection to ${this.url} closed (${event.code}${event.reason ? " " + event.reason : ""})`;
        this._failAll(new ConnectionError(reason));
        if (opened) this._emit("close", { code: event.code, reason: event.reason });
        if (!opened) reject(new ConnectionError(`cannot connect to ${this.url} (${event.code})`, "connect_failed"));
        if (!this._closed && this.reconnect) this._scheduleReconnect();
      };
    });
  }

  _scheduleReconnect() {
    if (this._reconnectTimer || this._closed) return;
    const delay = Math.min(this.backoff.maxMs, this.backoff.initialMs * this.backoff.factor ** this._attempt);
    this._attempt += 1;
    this._reconnectTimer = setTimeout(() => {
      this._reconnectTimer = null;
      this.connect().catch(() => this._scheduleReconnect());
    }, delay);
    this._reconnectTimer.unref?.();
  }

  _failAll(error) {
    const fifo = this._fifo;
    this._fifo = [];
    for (const r of fifo) this._settle(r, null, error);
  }

  _settle(request, value, error) {
    if (request.settled) return;
    request.settled = true;
    clearTimeout(request.timer);
    if (error) request.reject(error);
    else request.resolve(value);
  }

  _onMessage(data) {
    const request = this._fifo.shift();
    if (!request) return; // nothing was asked: ignore
    if (typeof data === "string") {
      let reply;
      try {
        reply = JSON.parse(data);
      } catch {
        return this._settle(request, null, new ClapError("the server sent a reply that is not JSON", "bad_reply"));
      }
      if (reply.id !== undefined && reply.id !== null && reply.id !== request.id) {
        return this._settle(request, null, new ClapError(`reply for ${reply.id} arrived for ${request.id}`, "out_of_order"));
      }
      if (reply.status === "ERROR") {
        const err = reply.error || {};
        return this._settle(request, null, new ClapError(err.message || "server error", err.code || "error", request.id));
      }
      return this._settle(request, request.parse(reply), null);
    }
    const floats = new Float32Array(data instanceof ArrayBuffer ? data : new Uint8Array(data).slice().buffer);
    this._settle(request, request.parse(floats), null);
  }

  /**
   * Send one request. `message` is a protocol object; `parse` maps the reply.
   * @returns {Promise<any>}
   */
  async request(message, parse = (r) => r, options = {}) {
    if (this._closed) throw new ConnectionError("client is closed", "closed");
    this._outstanding += 1;
    try {
      return await this._request(message, parse, options);
    } finally {
      this._outstanding -= 1;
    }
  }

  async _request(message, parse, options) {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const id = `r${this._nextId++}`;
    const started = Date.now();
    let timer;
    const deadline = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new TimeoutError(`no reply within ${timeoutMs} ms`, id)), timeoutMs);
      timer.unref?.();
    });
    try {
      await Promise.race([this.connect(), deadline]);
    } catch (error) {
      clearTimeout(timer);
      throw error;
    }
    clearTimeout(timer);
    return new Promise((resolve, reject) => {
      const request = { id, parse, resolve, reject, settled: false };
      const remaining = Math.max(1, timeoutMs - (Date.now() - started));
      request.timer = setTimeout(() => this._settle(request, null, new TimeoutError(`no reply within ${timeoutMs} ms`, id)), remaining);
      request.timer.unref?.();
      this._fifo.push(request);
      try {
        this._ws.send(JSON.stringify({ ...message, id }));
      } catch (error) {
        this._settle(request, null, new ConnectionError(`send failed: ${error.message}`));
      }
    });
  }

  // ---- the API ---------------------------------------------------------------------------------
  /** Embed one sound. Resolves to {embedding: Float32Array, model, ...extras}. */
  embed(audio, opts = {}) {
    const binary = this.binaryReplies && !hasScoring(opts);
    const message = { op: "embed", audio_buffer: base64(toFloat32(audio)), ...audioFields(opts), ...scoringFields(opts) };
    if (binary) message.reply = "binary";
    return this.request(message, (reply) => (reply instanceof Float32Array
      ? { embedding: reply }
      : { embedding: vec(reply.embedding), model: reply.model, ...itemsOf(reply, 0, false), timing: timing(reply) }), opts);
  }

  /** Embed many sounds in one message. Resolves to {embeddings: Float32Array[], model, items: [...extras]}. */
  embedBatch(audios, opts = {}) {
    const binary = this.binaryReplies && !hasScoring(opts);
    const message = { op: "embed_batch", audio_buffers: audios.map((a) => base64(toFloat32(a))), ...audioFields(opts), ...scoringFields(opts) };
    if (binary) message.reply = "binary";
    return this.request(message, (reply) => {
      if (reply instanceof Float32Array) {
        return { embeddings: audios.map((_, i) => reply.slice(i * DIM, (i + 1) * DIM)) };
      }
      return {
        embeddings: reply.embeddings.map(vec), model: reply.model, timing: timing(reply),
        items: reply.embeddings.map((_, i) => itemsOf(reply, i, true)),
      };
    }, opts);
  }

  /** Text embeddings in the same space. Resolves to Float32Array[]. */
  embedText(texts, opts = {}) {
    return this.request({ op: "embed_text", texts }, (reply) => reply.embeddings.map(vec), opts);
  }

  /** Cosine similarity of a sound to each prompt: {prompt: cosine}. */
  async similarity(audio, prompts, opts = {}) {
    const result = await this.embed(audio, { ...opts, prompts });
    return result.similarity;
  }

  /** Search the server's libraries by {text, audio, embedding, item, topK, alpha, tags, library, sampleRate,
   *  offset, minScore, minDuration, maxDuration}. Resolves to the matches (see searchPage for the whole reply). */
  search(query = {}, opts = {}) {
    return this.request(searchMessage(query), (reply) => reply.matches, opts);
  }

  /** Like search, resolving to {matches, count, offset, more, model}: one page, and whether there is a next. */
  searchPage(query = {}, opts = {}) {
    return this.request(searchMessage(query), (reply) => ({
      matches: reply.matches, count: reply.count, offset: reply.offset, more: reply.more, model: reply.model,
    }), opts);
  }

  /**
   * Fit behaviour descriptors on a named archive, in the background: resolves at once to {started, version,
   * nextVersion, items}; projectionInfo() says when it is installed. options: dims (6), method ("triplet" | "pca"),
   * hidden ([64]), epochs, seed, triplets: [{anchor, positive, negative}] by archive item id (people's judgements).
   */
  fitProjection(archive, options = {}) {
    const message = { op: "projection_fit", archive };
    for (const key of ["dims", "method", "hidden", "epochs", "seed", "triplets"]) {
      if (options[key] !== undefined) message[key] = options[key];
    }
    return this.request(message, (reply) => ({
      started: reply.started, version: reply.version, nextVersion: reply.next_version, items: reply.items,
    }), options);
  }

  /** What projection is installed ({version, method, dims, figures, fittedOn...} or null), and any fit running. */
  projectionInfo(opts = {}) {
    return this.request({ op: "projection_info" }, (reply) => ({
      installed: reply.installed, fitting: reply.fitting, lastError: reply.last_error, how: reply.how,
    }), opts);
  }

  /** The loaded libraries: [{name, count, tags: {tag: count}, duration: [min, max], ...}]. */
  libraries(opts = {}) {
    return this.request({ op: "libraries" }, (reply) => reply.libraries, opts);
  }

  _archiveItems(items, opts) {
    const first = items[0];
    if (first instanceof Float32Array && first.length === DIM && !opts.audio) {
      return { embeddings: items.map(plainVector) };
    }
    return { audio_buffers: items.map((a) => base64(toFloat32(a))), ...audioFields(opts) };
  }

  /** Add embeddings (Float32Array(512) each) or sounds (pass {audio: true}) to a named archive. */
  archiveAdd(archive, items, opts = {}) {
    const message = { op: "archive_add", archive, ...this._archiveItems(items, opts) };
    if (opts.ids) message.ids = opts.ids;
    return this.request(message, (r) => ({ added: r.added, count: r.count }), opts);
  }

  /** Novelty of each item: mean cosine distance to its k nearest archived items. Resolves to number[]. */
  novelty(archive, items, opts = {}) {
    const message = { op: "novelty", archive, k: opts.k ?? 15, ...this._archiveItems(items, opts) };
    return this.request(message, (r) => r.novelty, opts);
  }

  /** Nearest archived items per query: [[{id, score}]]. */
  archiveSearch(archive, items, opts = {}) {
    const message = { op: "archive_search", archive, top_k: opts.topK ?? 10, ...this._archiveItems(items, opts) };
    return this.request(message, (r) => r.matches, opts);
  }

  archiveInfo(archive, opts = {}) {
    return this.request(archive ? { op: "archive_info", archive } : { op: "archive_info" }, (r) => r, opts);
  }

  archiveDrop(archive, opts = {}) {
    return this.request({ op: "archive_drop", archive }, (r) => r.dropped, opts);
  }

  /** The server's model, device, precision, queue and counters. */
  info(opts = {}) {
    return this.request({ op: "info" }, (r) => r, opts);
  }

  /** Close the connection; every pending promise is rejected with a ConnectionError. */
  close() {
    this._closed = true;
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = null;
    this._failAll(new ConnectionError("client closed", "closed"));
    if (this._ws) {
      try {
        this._ws.close(1000);
      } catch {
        /* already closing */
      }
    }
    this._ws = null;
  }
}

// ---- a pool over several servers ------------------------------------------------------------
const RETRYABLE = new Set(["connection_lost", "connect_failed", "busy", "shutting_down"]);

export class ClapPool {
  /**
   * @param {string[]} urls servers to spread requests over
   * @param {object} [options] strategy ("least-pending" | "round-robin"), and ClapClient options
   */
  constructor(urls, options = {}) {
    if (!urls.length) throw new TypeError("ClapPool needs at least one server URL");
    this.strategy = options.strategy ?? "least-pending";
    if (!["least-pending", "round-robin"].includes(this.strategy)) throw new TypeError(`unknown strategy ${this.strategy}`);
    this.clients = urls.map((url) => new ClapClient(url, options));
    this._next = 0;
    this._closed = false;
  }

  /** Open every connection; resolves when at least one is open. */
  async connect() {
    const results = await Promise.allSettled(this.clients.map((c) => c.connect()));
    if (!results.some((r) => r.status === "fulfilled")) {
      throw new ConnectionError("no server of the pool could be reached", "connect_failed");
    }
  }

  /** Clients that are open now. */
  get healthy() {
    return this.clients.filter((c) => c.isOpen);
  }

  _pick(exclude) {
    const open = this.healthy.filter((c) => c !== exclude);
    const candidates = open.length ? open : this.clients.filter((c) => c !== exclude);
    if (!candidates.length) return exclude;
    if (this.strategy === "round-robin") return candidates[this._next++ % candidates.length];
    return candidates.reduce((best, c) => (c.pending < best.pending ? c : best));
  }

  async _run(call, pinned) {
    if (this._closed) throw new ConnectionError("pool is closed", "closed");
    const first = pinned ?? this._pick();
    try {
      return await call(first);
    } catch (error) {
      if (pinned || !(error instanceof ClapError) || !RETRYABLE.has(error.code)) throw error;
      const second = this._pick(first); // retried once, elsewhere
      if (second === first) throw error;
      return call(second);
    }
  }

  // Archives live on one server: a name always maps to the same one (while it is healthy).
  _home(archive) {
    let h = 0;
    for (const ch of archive) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    const open = this.healthy;
    const list = open.length ? open : this.clients;
    return list[h % list.length];
  }

  embed(audio, opts) { return this._run((c) => c.embed(audio, opts), opts?.archiveAdd || opts?.archive ? this._home(opts.archive) : undefined); }
  embedBatch(audios, opts) { return this._run((c) => c.embedBatch(audios, opts), opts?.archive ? this._home(opts.archive) : undefined); }
  embedText(texts, opts) { return this._run((c) => c.embedText(texts, opts)); }
  similarity(audio, prompts, opts) { return this._run((c) => c.similarity(audio, prompts, opts)); }
  search(query, opts) { return this._run((c) => c.search(query, opts)); }
  archiveAdd(archive, items, opts) { return this._run((c) => c.archiveAdd(archive, items, opts), this._home(archive)); }
  novelty(archive, items, opts) { return this._run((c) => c.novelty(archive, items, opts), this._home(archive)); }
  archiveSearch(archive, items, opts) { return this._run((c) => c.archiveSearch(archive, items, opts), this._home(archive)); }
  archiveInfo(archive, opts) { return this._run((c) => c.archiveInfo(archive, opts), archive ? this._home(archive) : undefined); }
  archiveDrop(archive, opts) { return this._run((c) => c.archiveDrop(archive, opts), this._home(archive)); }
  info(opts) { return Promise.all(this.clients.map((c) => c.info(opts).catch((e) => ({ url: c.url, error: e.code })))); }

  /** Close every connection; every pending promise settles. */
  close() {
    this._closed = true;
    for (const c of this.clients) c.close();
  }
}

/**
 * The legacy pattern, for comparison and old call sites: a fresh socket for one sound,
 * `?sample_rate=` in the URL, the bare Float32Array as a binary frame, one JSON reply.
 */
export async function embedOnce(url, audio, { sampleRate = 48000, timeoutMs = 120_000, WebSocket } = {}) {
  const WS = await webSocketClass(WebSocket);
  const sep = url.includes("?") ? "&" : "?";
  return new Promise((resolve, reject) => {
    const ws = new WS(`${url}${sep}sample_rate=${sampleRate}`);
    ws.binaryType = "arraybuffer";
    const timer = setTimeout(() => { ws.close(); reject(new TimeoutError(`no reply within ${timeoutMs} ms`)); }, timeoutMs);
    ws.onopen = () => ws.send(littleEndianBytes(toFloat32(audio)));
    ws.onmessage = (event) => {
      clearTimeout(timer);
      const reply = JSON.parse(event.data);
      ws.close(1000);
      if (reply.status === "ERROR") reject(new ClapError(reply.error?.message ?? "server error", reply.error?.code));
      else resolve({ embedding: vec(reply.features), model: reply.model });
    };
    ws.onerror = () => {};
    ws.onclose = (event) => { clearTimeout(timer); reject(new ConnectionError(`closed (${event.code}) before a reply`)); };
  });
}
