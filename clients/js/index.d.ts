// Types for clap-ws-client. Hand-written; checked by `npm run typecheck` (tsc --noEmit).

export type AudioInput = Float32Array | ArrayLike<number>;

export interface AudioOptions {
  /** Hz, 8000-192000 (default: the server's, 48000). */
  sampleRate?: number;
  /** Interleaved channels in the buffer (default 1). */
  channels?: number;
  normalize?: "none" | "peak";
  longClip?: "mean" | "head" | "center";
}

export interface RequestOptions {
  /** Reject with TimeoutError when no reply comes within this many ms (default: the client's). */
  timeoutMs?: number;
}

export interface ScoringOptions {
  prompts?: string[];
  probs?: boolean;
  references?: Array<Float32Array | number[]>;
  topK?: number;
  library?: string;
  tags?: string[];
  archive?: string;
  k?: number;
  archiveAdd?: boolean;
  ids?: unknown[];
  /** Behaviour descriptors from the server's projection (as on /clap-bd). */
  descriptor?: boolean;
}

export type EmbedOptions = AudioOptions & ScoringOptions & RequestOptions;

export interface Match {
  /** The item's id in its library (for item searches and /audio/LIBRARY/ID). */
  id: number;
  path: string;
  /** Cosine similarity; null when browsing by filters alone. */
  score: number | null;
  tags: string[];
  library: string;
  duration: number | null;
  sample_rate: number | null;
  channels: number | null;
}

export interface SearchPage {
  matches: Match[];
  count: number;
  offset: number;
  /** Whether a next page exists. */
  more: boolean;
  model: string;
}

export interface ProjectionOptions extends RequestOptions {
  dims?: number;
  method?: "triplet" | "pca";
  hidden?: number[];
  epochs?: number;
  seed?: number;
  /** People's judgements, by archive item id: they take precedence over CLAP's distances. */
  triplets?: Array<{ anchor: unknown; positive: unknown; negative: unknown }>;
}

export interface ProjectionInfo {
  installed: ({ version: number; method?: string; dims?: number; dimensions: number; figures?: Record<string, Record<string, number>>;
    fitted_on?: Record<string, unknown> } & Record<string, unknown>) | null;
  fitting: Record<string, unknown> | null;
  lastError: string | null;
  how?: string;
}

export interface LibraryInfo {
  name: string;
  count: number;
  model: string;
  tags: Record<string, number>;
  duration: [number, number] | null;
  [key: string]: unknown;
}

export interface ArchiveMatch {
  id: unknown;
  score: number;
}

export interface Extras {
  similarity?: Record<string, number>;
  probs?: Record<string, number>;
  referenceSimilarity?: number[];
  matches?: Match[];
  novelty?: number | null;
  archiveCount?: number;
  /** null while the server has no projection (warnings then say how to fit one). */
  behaviorDescriptor?: number[] | null;
  /** Which projection made behaviorDescriptor: it goes up by one with every fit installed. */
  projectionVersion?: number | null;
  /** Answered from the server's audio cache (the same embedding, bit for bit, without a model call). */
  cached?: boolean;
  /** What the server served but wants the client to know (samples clipped, unknown URL keys). */
  warnings?: string[];
}

export interface Timing {
  seconds: number;
  queueMs: number;
  modelMs: number;
}

export interface EmbedResult extends Extras {
  embedding: Float32Array;
  /** The model that produced it: a checkpoint file name, or "untrained". Absent for binary replies. */
  model?: string;
  timing?: Timing;
}

export interface BatchResult {
  embeddings: Float32Array[];
  model?: string;
  timing?: Timing;
  items?: Extras[];
}

export interface SearchQuery extends AudioOptions {
  text?: string;
  audio?: AudioInput;
  embedding?: Float32Array | number[];
  /** "More like this": a library item's own embedding as the query, the item left out. */
  item?: { library: string; id: number };
  topK?: number;
  offset?: number;
  minScore?: number;
  minDuration?: number;
  maxDuration?: number;
  /** Weight of the text in a text + audio query (0-1, default 0.5). */
  alpha?: number;
  tags?: string[];
  library?: string;
}

export interface ArchiveOptions extends AudioOptions, RequestOptions {
  /** Treat the items as sounds even if they are 512 samples long. */
  audio?: boolean;
  ids?: unknown[];
  k?: number;
  topK?: number;
}

export interface BackoffOptions {
  initialMs?: number;
  maxMs?: number;
  factor?: number;
}

export interface ClientOptions {
  timeoutMs?: number;
  reconnect?: boolean;
  backoff?: BackoffOptions;
  /** Ask for raw float32 replies when no extras are requested (default true). */
  binaryReplies?: boolean;
  /** A WebSocket class to use instead of `ws` / the global one. */
  WebSocket?: unknown;
}

export interface PoolOptions extends ClientOptions {
  strategy?: "least-pending" | "round-robin";
}

export class ClapError extends Error {
  /** The server's error code (see PROTOCOL.md), or "timeout", "connection_lost", "closed", ... */
  code: string;
  requestId?: string;
  constructor(message: string, code?: string, requestId?: string);
}
export class TimeoutError extends ClapError {}
export class ConnectionError extends ClapError {}

/** The requests a client and a pool both make. */
export interface ClapRequests {
  embed(audio: AudioInput, options?: EmbedOptions): Promise<EmbedResult>;
  embedBatch(audios: AudioInput[], options?: EmbedOptions): Promise<BatchResult>;
  embedText(texts: string[], options?: RequestOptions): Promise<Float32Array[]>;
  similarity(audio: AudioInput, prompts: string[], options?: EmbedOptions): Promise<Record<string, number>>;
  search(query: SearchQuery, options?: RequestOptions): Promise<Match[]>;
  archiveAdd(archive: string, items: AudioInput[], options?: ArchiveOptions): Promise<{ added: number; count: number }>;
  novelty(archive: string, items: AudioInput[], options?: ArchiveOptions): Promise<number[]>;
  archiveSearch(archive: string, items: AudioInput[], options?: ArchiveOptions): Promise<ArchiveMatch[][]>;
  archiveInfo(archive?: string, options?: RequestOptions): Promise<Record<string, unknown>>;
  archiveDrop(archive: string, options?: RequestOptions): Promise<number>;
  connect(): Promise<void>;
  close(): void;
}

export interface ClapClient extends ClapRequests {}
export class ClapClient {
  constructor(url: string, options?: ClientOptions);
  readonly url: string;
  readonly isOpen: boolean;
  readonly pending: number;
  onStateChange(listener: (state: "open" | "close", detail?: { code: number; reason: string }) => void): () => void;
  request<T = unknown>(message: Record<string, unknown>, parse?: (reply: any) => T, options?: RequestOptions): Promise<T>;
  info(options?: RequestOptions): Promise<Record<string, unknown>>;
  searchPage(query: SearchQuery, options?: RequestOptions): Promise<SearchPage>;
  libraries(options?: RequestOptions): Promise<LibraryInfo[]>;
  fitProjection(archive: string, options?: ProjectionOptions): Promise<{ started: boolean; version: number; nextVersion: number; items: number }>;
  projectionInfo(options?: RequestOptions): Promise<ProjectionInfo>;
}

export interface ClapPool extends ClapRequests {}
export class ClapPool {
  constructor(urls: string[], options?: PoolOptions);
  readonly clients: ClapClient[];
  readonly healthy: ClapClient[];
  /** One info reply per server (or {url, error} for one that is down). */
  info(options?: RequestOptions): Promise<Array<Record<string, unknown>>>;
}

export function embedOnce(url: string, audio: AudioInput, options?: { sampleRate?: number; timeoutMs?: number; WebSocket?: unknown }): Promise<{ embedding: Float32Array; model?: string }>;
