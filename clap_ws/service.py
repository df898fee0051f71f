"""What each request does, independent of sockets.

:class:`Service` owns the model's batcher, the prompt cache, the loaded
libraries, the archives and the optional projection. The server hands it one
validated request at a time (:meth:`Service.dispatch`), and gets back an
awaitable that yields the reply frame.

``dispatch`` does all the synchronous work first - checks that named
libraries exist, prepares audio, queues model work - so a full queue answers
``busy`` at once and work is queued in the order requests arrived. The
awaitable then gathers the model's results and computes the extras.

Library and archive work (FAISS searches, adds, novelty) runs on one
dedicated thread: it never blocks the event loop, and it needs no locks.

A prompt is embedded once even when many requests ask for it at the same
time: requests for a text already on its way to the model wait for that
result instead of running a model call of their own.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .audio import AudioSpec, load, windows
from .batching import MicroBatcher
from .constants import SAMPLE_RATE
from .cpu import instruction_set
from .descriptors import HOW, Descriptors
from .errors import ClapError, ErrorCode
from .inference import AudioJob, Inference, TextJob
from .inflight import Computed
from .metrics import Metrics
from .model.clap import ClapModel, model_identity
from .projection import Projection
from .protocol import (
    OPS,
    ArchiveDropRequest,
    ArchiveInfoRequest,
    ArchiveRequest,
    EmbedRequest,
    InfoRequest,
    LibrariesRequest,
    Message,
    ProjectionFitRequest,
    ProjectionInfoRequest,
    SearchRequest,
    TextRequest,
    embedding_reply,
    ok_reply,
)
from .search.archive import Archives
from .search.library import Filters, Library, Page, find
from .search.scan import choose_kernel, single_threaded
from .similarity import EmbeddingCache, cosine_matrix, softmax_probs, unit
from .state import ServerState

_log = logging.getLogger(__name__)
Reply = tuple[bytes, bool]


@dataclass
class SoundResult:
    """One request's sound embeddings (rows in request order), its model timings and which rows were cached."""

    embeddings: np.ndarray
    queue_ms: float
    model_ms: float
    cached: list[bool]
OFF_LOOP_BYTES = 4 << 20  # messages and audio larger than this are parsed and prepared on the decode thread


class Service:
    """The application: embeddings, similarity, libraries, archives."""

    def __init__(self, model: ClapModel, *, max_batch: int = 32, max_wait_ms: float = 0.0, max_queue: int = 1024,
                 max_batch_ms: float = 0.0,
                 max_seconds: float = 60.0, warm_up: bool = True, libraries: Sequence[Library] = (),
                 archives: Archives | None = None, projection: Projection | None = None,
                 text_cache: int = 4096, audio_cache: int = 2048, state: ServerState | None = None):
        self.model = model
        self.state = state or ServerState()  # the server's counters, for info, /health and /metrics
        self.max_seconds = max_seconds
        self.metrics = Metrics()
        self.metrics.observe_state(self.metrics_state)
        self.inference = Inference(model, self.metrics)
        self.batcher = MicroBatcher(
            self.inference.stream, max_batch=max_batch, max_wait_ms=max_wait_ms, max_batch_ms=max_batch_ms,
            max_queue=max_queue, on_start=model.warm_up if warm_up else None,
        )
        identity = model_identity(model)
        for library in libraries:
            library.check_model(identity)
        self.libraries = {lib.name: lib for lib in libraries}
        self.archives = archives or Archives()
        self.descriptors = Descriptors(projection, self.archives.directory)
        self.text_cache = EmbeddingCache(text_cache)
        self.audio_cache = EmbeddingCache(audio_cache)  # content hash -> (embedding, warnings)
        self._model_key = repr(sorted(model_identity(model).items()))
        self._silence_key = ("silence", self._model_key)  # all-zero windows: one model input, whatever the length
        self.sounds = Computed(self.audio_cache, "audio", self.batcher.withdraw)  # content hash -> embedding
        self.texts = Computed(self.text_cache, "text", self.batcher.withdraw)  # text -> embedding
        # Index work (search, archives) runs on this one thread, with torch serial on it (see
        # scan.single_threaded); the int8 blocks of what was loaded are built there too, before any search.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clap-index", initializer=single_threaded)
        # Large messages are parsed, decoded and resampled here, one at a time, so the event loop stays free
        # for pings, info and /health; their steps (base64 per buffer, soxr) let go of the GIL between buffers.
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="clap-decode")
        self.search_kernel = self._pool.submit(choose_kernel).result()
        _log.info("exact search pre-scans: %s (checked against float32 on this CPU: %s)",
                  self.search_kernel, instruction_set())
        for index in [lib.index for lib in libraries] + [self.archives.get(n).index for n in self.archives.names()]:
            self._pool.submit(index.scan.pack)

    @property
    def text_model_calls(self) -> int:
        """Batches that embedded texts: the texts of one batch share a call (of up to 64 texts)."""
        return self.inference.text_calls

    def close(self) -> None:
        self.batcher.stop(10)
        self._pool.submit(self.archives.flush).result()
        self._pool.shutdown()
        self._decoder.shutdown()
        self.descriptors.close()

    async def flush_archives(self) -> int:
        return await self._in_pool(self.archives.flush)

    async def _in_pool(self, fn: Callable, *args) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def off_loop(self, size: int, fn: Callable, *args) -> Any:
        """``fn(*args)``: at once for ``size`` up to :data:`OFF_LOOP_BYTES`, else on the decode thread, so one
        large message never stalls the other connections (small ones skip the thread hop)."""
        if size <= OFF_LOOP_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    # ---- dispatch ---------------------------------------------------------------------
    async def dispatch(self, request: Message, received: float, descriptor: bool = False,
                       client: Hashable = None) -> asyncio.Task[Reply]:
        """Check ``request`` and queue its work; the returned task yields its reply frame.

        Returns once the work is queued: without suspending for small
        requests, after the decode thread has prepared the audio of large
        ones (so a connection's own next message waits for that, not the
        others). Raises :class:`~clap_ws.errors.ClapError` for what can be
        known before any model work: ``busy``, an unknown library or archive,
        bad audio, no tokenizer. ``descriptor`` adds behaviour descriptors
        (``/clap-bd``); ``client`` (a connection) is whose turn the model work waits for (see
        :mod:`clap_ws.batching`). Cancelling the task cancels model work that
        no other request waits for; it is always a task, so the caller never
        has to tell a finished reply from one still to be computed.
        """
        return asyncio.ensure_future(await self._prepare(request, received, descriptor, client))

    async def _prepare(self, request: Message, received: float, descriptor: bool,
                       client: Hashable) -> Awaitable[Reply]:
        model, handler = self.registry[request.op]
        assert isinstance(request, model), (request.op, type(request))
        return await handler(request, received=received, descriptor=descriptor, client=client)

    @functools.cached_property
    def registry(self) -> dict[str, tuple[type[Message], Callable[..., Awaitable[Awaitable[Reply]]]]]:
        """Every op: its request model (:mod:`clap_ws.protocol`) and its handler here; adding an op is a model
        there and a line here. A handler checks what it can now (raising :class:`~clap_ws.errors.ClapError`),
        queues its work and returns the awaitable reply."""
        handlers = {
            "embed": self._embed, "embed_batch": self._embed, "embed_text": self._embed_text,
            "search": self._search, "libraries": self._libraries, "info": self._info,
            "archive_add": self._with_vectors(self._archive_add), "novelty": self._with_vectors(self._novelty),
            "archive_search": self._with_vectors(self._archive_search),
            "archive_info": self._archive_info, "archive_drop": self._archive_drop,
            "projection_fit": self._projection_fit, "projection_info": self._projection_info,
        }
        return {op: (OPS[op], handler) for op, handler in handlers.items()}

    # ---- building blocks (synchronous part) -------------------------------------------
    async def _audio(self, buffers: list, spec: AudioSpec, client: Hashable = None,
                     warnings: list[list[str]] | None = None) -> asyncio.Task:
        """Embed every buffer once: from the audio cache, from a job already in flight for the same sound, or
        in one new job (decoded, resampled and windowed now, see :meth:`off_loop`) costing its windows.

        Returns once the work is queued; the task yields a :class:`SoundResult`. Raises
        :class:`~clap_ws.errors.ClapError` for bad audio or ``busy``. With ``warnings``, each buffer's warnings
        (see :func:`clap_ws.audio.prepare`) are appended as a list, for cached sounds too.
        """
        size = sum(memoryview(b).nbytes for b in buffers)
        keys = await self.off_loop(size, self._content_keys, buffers, spec) if self.audio_cache.capacity else \
            [None] * len(buffers)
        rows: list[Any] = [None] * len(buffers)
        notes: list[list[str]] = [[] for _ in buffers]
        todo: dict[Any, list[int]] = {}  # key (or a private one when not caching) -> the buffers with it
        for i, key in enumerate(keys):
            found = self.sounds.find(key) if key is not None else None
            if found is not None:
                rows[i], notes[i] = found
            else:
                todo.setdefault(key if key is not None else ("buffer", i), []).append(i)
        if todo:
            firsts = [group[0] for group in todo.values()]
            size = sum(memoryview(buffers[i]).nbytes for i in firsts)
            prepared = await self.off_loop(size, self._clips, [(i, buffers[i]) for i in firsts], spec,
                                           len(buffers) > 1)
            new: dict[Any, tuple[np.ndarray, list[int]]] = {}
            for (key, group), (clip, clip_notes) in zip(todo.items(), prepared):
                for i in group:
                    notes[i] = clip_notes
                if self.audio_cache.capacity and self.model.silent(clip):  # silence: one model input at any length
                    key = self._silence_key
                    silence = self.sounds.find(key, count=False)
                    if silence is not None:
                        self.audio_cache.hits, self.audio_cache.misses = self.audio_cache.hits + 1, \
                            self.audio_cache.misses - 1
                        for i in group:
                            rows[i] = silence[0]
                        continue
                new.setdefault(key, (clip, []))[1].extend(group)
            if new:
                clips = [clip for clip, _ in new.values()]
                job = self.batcher.submit(AudioJob(clips), key=client, cost=sum(len(c) for c in clips))
                started = self.sounds.start(
                    job, list(new), [notes[group[0]] for _, group in new.values()],
                    lambda result: [(vec, (result.queue_ms, result.model_ms)) for vec in result.embeddings],
                    share=bool(self.audio_cache.capacity))
                for row, (_, group) in zip(started, new.values()):
                    for i in group:
                        rows[i] = row
        if warnings is not None:
            warnings.extend(notes)
        flying = [isinstance(r, asyncio.Future) for r in rows]
        values = self.sounds.wait(rows)
        return _quiet(asyncio.ensure_future(self._sound_result(values, flying)))

    def _content_keys(self, buffers: list, spec: AudioSpec) -> list[bytes]:
        """A hash of each buffer's bytes and of everything else that decides its embedding (rate, channels,
        normalisation, long-clip mode, the model)."""
        context = repr((spec.sample_rate, spec.channels, spec.normalize, spec.long_clip, self._model_key)).encode()
        keys = []
        for data in buffers:
            digest = hashlib.blake2b(context, digest_size=20)
            digest.update(memoryview(data))
            keys.append(digest.digest())
        return keys

    @staticmethod
    async def _sound_result(values: asyncio.Task, flying: list[bool]) -> SoundResult:
        """The request's rows as one result: cached rows are vectors, computed ones (vector, timings)."""
        vectors, queue_ms, model_ms = [], 0.0, 0.0
        for value, computed in zip(await values, flying):
            if computed:
                value, (queue_ms, model_ms) = value
            vectors.append(value)
        return SoundResult(np.stack(vectors), queue_ms, model_ms, [not f for f in flying])

    def _clips(self, buffers: list[tuple[int, bytes]], spec: AudioSpec,
               batch: bool) -> list[tuple[np.ndarray, list[str]]]:
        """(windows, warnings) per (index, buffer); a bad buffer raises, named by its index in a batch."""
        out = []
        for i, data in buffers:
            notes: list[str] = []
            try:
                clip = load(data, spec, self.max_seconds, notes)
                self.metrics.clip_seconds.observe(len(clip) / SAMPLE_RATE)
                out.append((windows(clip, spec.long_clip), notes))
            except ClapError as exc:
                if batch:
                    exc.args = (f"audio_buffers[{i}]: {exc.message}",)
                raise
        return out

    def _texts(self, texts, client: Hashable = None) -> asyncio.Task:
        """Queue the texts neither cached nor in flight now, in one job; the task yields their (n, 512)
        embeddings in order (a job nobody waits for any more is cancelled, see :mod:`clap_ws.inflight`)."""
        if self.model.tokenizer is None:
            self.model.embed_text([])  # raises TextUnavailable with the full explanation
        rows: dict[str, Any] = {}
        for text in dict.fromkeys(texts):
            found = self.texts.find(text)
            rows[text] = found[0] if found is not None else None
        new = [t for t, row in rows.items() if row is None]
        if new:
            job = self.batcher.submit(TextJob(new), key=client, cost=len(new))
            started = self.texts.start(job, new, [()] * len(new),
                                       lambda result: [(vec, None) for vec in result.embeddings])
            rows.update(zip(new, started))
        values = self.texts.wait(list(rows.values()))
        order = {text: i for i, text in enumerate(rows)}

        async def in_order() -> np.ndarray:
            got = [v[0] if isinstance(v, tuple) else v for v in await values]
            return np.stack([got[order[t]] for t in texts])

        return _quiet(asyncio.ensure_future(in_order()))

    def _library(self, name: str | None) -> list[Library]:
        if not self.libraries:
            raise ClapError("no library is loaded; start the server with --library FILE", code=ErrorCode.NO_LIBRARY)
        if name is None:
            return list(self.libraries.values())
        if name not in self.libraries:
            raise ClapError(f"no library named {name!r} (loaded: {', '.join(self.libraries)})",
                            code=ErrorCode.UNKNOWN_LIBRARY)
        return [self.libraries[name]]

    @staticmethod
    def _search_libraries(libraries: list[Library], queries: np.ndarray, k: int, tags) -> list[list[dict]]:
        per_query: list[list[dict]] = [[] for _ in range(len(queries))]
        for library in libraries:
            for row, matches in zip(per_query, library.search(queries, k, Filters(tuple(tags)))):
                row.extend(matches)
        return [sorted(row, key=lambda m: -m["score"])[:k] for row in per_query]

    async def reload_library(self, name: str) -> Library:
        """Load library ``name`` again from its file and swap it in once its index is ready.

        Searches already running finish on the old one. Raises (and keeps the
        old one serving) when the file cannot be loaded or was built with
        another model.
        """
        old = self.libraries[name]
        new = await asyncio.to_thread(Library.load, old.path, name)
        new.check_model(model_identity(self.model))
        await self._in_pool(new.index.scan.pack)
        self.libraries[name] = new
        return new

    def describe_libraries(self) -> list[dict]:
        return [lib.describe() for lib in self.libraries.values()]

    def library(self, name: str) -> Library:
        """The loaded library ``name``; ``no_library`` or ``unknown_library`` when there is none."""
        return self._library(name)[0]

    def item_vector(self, library: str, item: int) -> np.ndarray:
        """A library item's stored embedding; ``unknown_library`` or ``not_found`` when there is none."""
        lib = self.library(library)
        lib.item(item)
        return lib.embeddings[item]

    async def text_vector(self, text: str, client: Hashable = None) -> np.ndarray:
        """One text's embedding (from the prompt cache when it is there)."""
        return (await self._texts([text], client))[0]

    async def find(self, query: np.ndarray | None, library: str | None, page: Page, filters: Filters,
                   exclude: tuple[str, int] | None = None) -> dict:
        """One page of results for ``query`` (None: browse by ``filters``) in one library or all, on the
        index thread; see :func:`clap_ws.search.library.find`."""
        return await self._in_pool(find, self._library(library), query, page, filters, exclude)

    # ---- ops ------------------------------------------------------------------------------
    async def _embed(self, req: EmbedRequest, *, received: float, descriptor: bool,
                     client: Hashable) -> Awaitable[Reply]:
        self.metrics.items.labels("audio").inc(len(req.buffers))
        libraries = self._library(req.library) if req.top_k else []
        if req.archive and not req.archive_add:
            self.archives.get(req.archive)  # unknown archive: say so now
        warnings: list[list[str]] = []
        audio = await self._audio(req.buffers, req.spec, client, warnings)
        warnings = [[*req.warnings, *notes] for notes in warnings]
        req.release()  # the windows are made: the frames need not wait for the reply
        prompts = self._texts(req.prompts, client) if req.prompts else None

        async def finish() -> Reply:
            result = await audio
            emb = result.embeddings
            extras: dict[str, list] = {"warnings": warnings} if any(warnings) else {}
            if self.audio_cache.capacity:
                extras["cached"] = result.cached
            if prompts is not None:
                cos = cosine_matrix(emb, await prompts)
                extras["similarity"] = [dict(zip(req.prompts or (), row)) for row in cos.tolist()]
                if req.probs:
                    p = softmax_probs(cos, self.model.logit_scale)
                    extras["probs"] = [dict(zip(req.prompts or (), row)) for row in p.tolist()]
            if req.reference_vectors is not None:
                extras["reference_similarity"] = cosine_matrix(emb, req.reference_vectors).tolist()
            if libraries:
                extras["matches"] = await self._in_pool(self._search_libraries, libraries, emb, req.top_k,
                                                        req.tags or ())
            if req.archive:
                extras.update(await self._in_pool(self._novelty_and_add, req, emb))
            if descriptor or req.descriptor:
                values, version = self.descriptors.apply(emb)
                extras["behavior_descriptor"] = values if values is not None else [None] * len(emb)
                extras["projection_version"] = [version] * len(emb)
                if values is None:
                    extras["warnings"] = [[*w, HOW] for w in warnings] if warnings else [[HOW]] * len(emb)
            return embedding_reply(req, emb, model=self.model.identity.name, seconds=time.perf_counter() - received,
                                   queue_ms=result.queue_ms, model_ms=result.model_ms, extras=extras)

        return finish()

    def _novelty_and_add(self, sc: EmbedRequest, emb: np.ndarray) -> dict[str, list]:
        """Novelty against the archive as it was, then (if asked) add these sounds.

        Unlike the ``novelty`` op, an archive with fewer than k items gives
        ``null`` novelty here instead of an error, so a loop can seed a new
        archive with the same message it uses every generation.
        """
        archive = self.archives.get(sc.archive or "", create=sc.archive_add)
        novelty = archive.novelty(emb, sc.k) if len(archive) >= sc.k else [None] * len(emb)
        if sc.archive_add:
            archive.add(emb, list(sc.ids) if sc.ids is not None else None)
        return {"novelty": novelty, "archive_count": [len(archive)] * len(emb)}

    async def _embed_text(self, req: TextRequest, *, received: float, client: Hashable, **_) -> Awaitable[Reply]:
        self.metrics.items.labels("text").inc(len(req.texts))
        cached_before = sum(t in self.text_cache for t in set(req.texts))
        gather = self._texts(req.texts, client)

        async def finish() -> Reply:
            emb = await gather
            return _ok("embed_text", {"embeddings": emb, "count": len(emb), "cached": cached_before,
                                           "model": self.model.identity.name,
                                           "time": time.perf_counter() - received}, req.id)

        return finish()

    async def _search(self, req: SearchRequest, *, client: Hashable, **_) -> Awaitable[Reply]:
        self._library(req.library)  # none loaded, or an unknown name: say so before any model work
        like = self.item_vector(*req.item_ref) if req.item_ref is not None else None
        audio = await self._audio(req.buffers, req.spec, client) if req.buffers else None
        text = self._texts([req.text], client) if req.text else None
        req.release()

        async def finish() -> Reply:
            sound: np.ndarray | None = (await audio).embeddings[0] if audio is not None else \
                (req.vector[0] if req.vector is not None else like)
            words = (await text)[0] if text is not None else None
            query: np.ndarray | None
            if words is not None and sound is not None:
                query = unit(req.alpha * unit(words) + (1 - req.alpha) * unit(sound))
            else:
                query = words if words is not None else sound
            page = await self.find(query, req.library, req.page, req.filters, req.item_ref)
            return _ok("search", {"matches": page.pop("results"), **page, "model": self.model.identity.name},
                       req.id)

        return finish()

    def _with_vectors(self, work: Callable[[ArchiveRequest, np.ndarray], dict]):
        """A handler for an archive op on embeddings: unknown archives and audio checked and queued now, then
        ``work`` on the index thread with the request's vectors (sent, or embedded from its audio)."""

        async def handler(req: ArchiveRequest, *, client: Hashable, **_) -> Awaitable[Reply]:
            if req.op != "archive_add":
                self.archives.get(req.archive)  # unknown archive: say so before any model work
            audio = await self._audio(req.buffers, req.spec, client) if req.buffers else None
            req.release()

            async def finish() -> Reply:
                vectors = (await audio).embeddings if audio is not None else req.vectors
                return _ok(req.op, await self._in_pool(work, req, vectors), req.id)

            return finish()

        return handler

    def _archive_add(self, req: ArchiveRequest, vectors: np.ndarray) -> dict:
        archive = self.archives.get(req.archive, create=True)
        archive.add(vectors, list(req.ids) if req.ids is not None else None)
        return {"archive": archive.name, "added": len(vectors), "count": len(archive)}

    def _novelty(self, req: ArchiveRequest, vectors: np.ndarray) -> dict:
        archive = self.archives.get(req.archive)
        return {"archive": archive.name, "k": req.k, "novelty": archive.novelty(vectors, req.k), "count": len(archive)}

    def _archive_search(self, req: ArchiveRequest, vectors: np.ndarray) -> dict:
        archive = self.archives.get(req.archive)
        return {"archive": archive.name, "matches": archive.search(vectors, req.top_k), "count": len(archive)}

    async def _archive_info(self, req: ArchiveInfoRequest, **_) -> Awaitable[Reply]:
        def describe() -> dict:
            if req.archive:
                return self.archives.get(req.archive).describe()
            return {"archives": [self.archives.get(n).describe() for n in self.archives.names()]}

        return self._on_index_thread(req, describe)

    async def _archive_drop(self, req: ArchiveDropRequest, **_) -> Awaitable[Reply]:
        return self._on_index_thread(req, lambda: {"archive": req.archive, "dropped": self.archives.drop(
            self.archives.get(req.archive).name)})

    def _on_index_thread(self, req: Message, work: Callable[[], dict]) -> Awaitable[Reply]:
        async def finish() -> Reply:
            return _ok(req.op, await self._in_pool(work), req.id)

        return finish()

    async def _info(self, req: InfoRequest, **_) -> Awaitable[Reply]:
        return done(_ok("info", self.describe(), req.id))

    async def _libraries(self, req: LibrariesRequest, **_) -> Awaitable[Reply]:
        return done(_ok("libraries", {"libraries": self.describe_libraries()}, req.id))

    async def _projection_info(self, req: ProjectionInfoRequest, **_) -> Awaitable[Reply]:
        return done(_ok("projection_info", self.descriptors.info(), req.id))

    async def _projection_fit(self, req: ProjectionFitRequest, **_) -> Awaitable[Reply]:
        archive = self.archives.get(req.archive)
        vectors, ids = await self._in_pool(lambda: (archive.index.vectors.copy(), list(archive.ids)))
        started = self.descriptors.start_fit(vectors, ids, req, archive.name)
        return done(_ok("projection_fit", {"started": True, **started}, req.id))

    # ---- introspection --------------------------------------------------------------------
    def describe(self) -> dict:
        """The one description of the running server: what ``info`` and ``/api/info`` answer and the page shows."""
        return {**self.info(), **self.state.describe()}

    def metrics_state(self) -> dict:
        """What each scrape of ``GET /metrics`` reads (see :mod:`clap_ws.metrics`)."""
        service = self
        model = self.model.describe()
        return {
            "batches": self.batcher.batches, "dropped": self.batcher.dropped,
            "worker_restarts": self.state.worker_restarts,
            "audio_windows": service.inference.audio_windows, "text_cache": service.text_cache.describe(),
            "audio_cache": service.audio_cache.describe(), "queue_depth": self.batcher.depth,
            "queue_load": self.batcher.load, "connections": self.state.connections, "worker_alive": self.batcher.alive,
            "projection_version": service.descriptors.version,
            "libraries": {name: len(lib) for name, lib in service.libraries.items()},
            "archives": service.archives.sizes(),
            "info": {"version": __version__, "model": model["model"],
                     "checkpoint_sha256": model["checkpoint_sha256"] or "", "device": model["device"],
                     "precision": model["precision"], "engine": model["engine"],
                     "engine_ms_per_window": ",".join(f"{k}={v}" for k, v in
                                                      (model["engine_auto"] or {}).get("ms_per_window", {}).items())},
        }

    def info(self) -> dict:
        return {
            **self.model.describe(),
            "queue_depth": self.batcher.depth,
            "batches": self.batcher.batches,
            "items": self.batcher.items,
            "dropped": self.batcher.dropped,
            "text_model_calls": self.text_model_calls,
            "audio_windows": self.inference.audio_windows,
            "text_cache": self.text_cache.describe(),
            "audio_cache": self.audio_cache.describe(),
            "cpu": instruction_set(),
            "search_kernel": self.search_kernel,
            "libraries": [{"name": lib.name, "count": len(lib), "index": lib.index.kind, "root": lib.root,
                           "prescan": lib.index.scan.prescan}
                          for lib in self.libraries.values()],
            "archives": len(self.archives.names()),
            "projection": None if self.descriptors.projection is None else
            {"source": self.descriptors.projection.source, "dimensions": self.descriptors.projection.dims,
             "version": self.descriptors.version},
        }


def _ok(op: str, body: dict, request_id: Any) -> Reply:
    return ok_reply(op, body, request_id), True


def _quiet(task: asyncio.Task) -> asyncio.Task:
    """A task whose failure its request may never read (it left first): no 'exception never retrieved'."""
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return task


async def done(reply: Reply) -> Reply:
    """A reply known at once, as an awaitable like the others."""
    return reply
