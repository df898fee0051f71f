"""AsyncClapClient: one WebSocket connection to a clap-ws server, many requests in flight on it.

The server answers the requests of a connection strictly in the order they
arrived, so replies are matched to requests by order (a FIFO); JSON replies
also echo the request's id, which is checked. Embeddings come back as binary
frames of float32 (``reply="binary"``, the default) unless the call asks for
more than the embedding (prompts, matches, novelty ...), which needs JSON.
Sounds go out as binary frames where the connection's options fit them (one
sound, its rate the connection's), else as base64 in JSON.

A call that times out raises :class:`~clap_ws_client.errors.TimeoutError`
and leaves the connection usable: its place in the FIFO stays, and its late
reply is dropped when it comes. A lost connection fails what was in flight
with :class:`~clap_ws_client.errors.ConnectionError`; requests that are safe
to repeat (embeddings, searches, reads) are sent once more on a new
connection, opened with exponential backoff; the others (``archive_add``,
``archive_drop``, ``projection_fit``) are not, since they may already have
been applied, and say so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from .errors import ClapError, ConnectionError, TimeoutError

DIM = 512
IDEMPOTENT = frozenset({"embed", "embed_batch", "embed_text", "search", "libraries", "info", "novelty",
                        "archive_search", "archive_info", "projection_info"})
_SCORING = ("prompts", "probs", "references", "top_k", "library", "tags", "archive", "k", "archive_add", "ids",
            "descriptor")


@dataclass
class Embedding:
    """One sound's reply: ``embedding`` (512,) float32, unit norm, and whatever else the call asked for."""

    embedding: np.ndarray
    model: str | None = None
    cached: bool | None = None
    similarity: dict[str, float] | None = None
    probs: dict[str, float] | None = None
    reference_similarity: list[float] | None = None
    matches: list[dict] | None = None
    novelty: float | None = None
    archive_count: int | None = None
    behavior_descriptor: list[float] | None = None
    projection_version: int | None = None
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)


def as_audio(audio: Any, where: str = "audio") -> tuple[np.ndarray, int]:
    """Float samples, mono ``(frames,)`` or ``(frames, channels)``, as interleaved float32 and the channel count.

    Raises ValueError before anything is sent: integer samples, empty audio, a wrong shape, NaN or infinite
    samples."""
    array = np.asarray(audio)
    if array.dtype.kind != "f":
        raise ValueError(f"{where} must be float samples in [-1, 1], not {array.dtype} (int16 PCM: divide by 32768)")
    if array.ndim not in (1, 2):
        raise ValueError(f"{where} must be (frames,) or (frames, channels), not shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{where} is empty")
    channels = 1 if array.ndim == 1 else array.shape[1]
    if array.ndim == 2 and not 1 <= channels <= 64:
        raise ValueError(f"{where} has {channels} channels; (frames, channels) with 1 to 64 channels")
    samples = np.ascontiguousarray(array, dtype="<f4").reshape(-1)
    if not np.isfinite(samples).all():
        raise ValueError(f"{where} contains NaN or infinite samples")
    return samples, channels


def as_vectors(vectors: Any, where: str = "embeddings") -> list[list[float]]:
    """(n, 512) or (512,) numbers as JSON rows; ValueError for another shape or non-finite values."""
    array = np.asarray(vectors, dtype=np.float64)
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != DIM or len(array) == 0 or not np.isfinite(array).all():
        raise ValueError(f"{where} must be finite (n, {DIM}) or ({DIM},) arrays, not shape {array.shape}")
    return array.tolist()


def _b64(samples: np.ndarray) -> str:
    return base64.b64encode(samples.tobytes()).decode()


class _Pending:
    __slots__ = ("id", "future", "parse")

    def __init__(self, request_id: str, future: asyncio.Future, parse: Callable[[Any], Any]):
        self.id, self.future, self.parse = request_id, future, parse


class _Connection:
    """One WebSocket and the calls sent on it, in order; a new connection starts with an empty FIFO."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.fifo: deque[_Pending] = deque()
        self.reader: asyncio.Task | None = None


class AsyncClapClient:
    """A clap-ws client on one connection. ``async with AsyncClapClient(url) as client: ...``

    ``url``: ``ws://HOST:PORT/clap`` (or ``/clap-bd`` for behaviour descriptors). ``token``: the server's
    ``--token``. ``timeout``: seconds per call (each call may override it). ``reply``: ``"binary"`` (float32
    frames for embeddings) or ``"json"``. ``sample_rate``: the rate of sounds sent as binary frames (other rates
    go as JSON). ``max_in_flight``: calls on the wire at once; more wait for room. ``retries``: how many
    reconnects a safe call may wait for.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, reply: str = "binary", *,
                 sample_rate: float = 48_000, max_in_flight: int = 64, retries: int = 1,
                 backoff: tuple[float, float] = (0.1, 5.0)):
        if reply not in ("binary", "json"):
            raise ValueError(f"reply must be 'binary' or 'json', not {reply!r}")
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"url must start with ws:// or wss://, not {url!r}")
        self.url = url
        self.token, self.timeout, self.reply, self.sample_rate = token, timeout, reply, float(sample_rate)
        self.retries, self.backoff = retries, backoff
        query = urlencode({"sample_rate": f"{self.sample_rate:g}", "reply": reply})
        self._url = urlunsplit(parts._replace(query="&".join(filter(None, [parts.query, query]))))
        self._conn: _Connection | None = None
        self._opened = 0
        self._outstanding = 0
        self._room = asyncio.Semaphore(max_in_flight)
        self._opening: asyncio.Lock | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self.reconnects = 0  # connections opened after the first
        self.model: str | None = None  # what the server named at the last handshake (``X-Clap-Model``)

    # ---- connection ---------------------------------------------------------------------------------
    async def __aenter__(self) -> AsyncClapClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def pending(self) -> int:
        """Calls made and not settled yet, counted from the call (so a pool can route by it at once)."""
        return self._outstanding

    async def connect(self) -> None:
        """Open the connection (calls do it by themselves); ConnectionError when the server cannot be reached."""
        if self._closed:
            raise ConnectionError("the client is closed", "closed")
        self._opening = self._opening or asyncio.Lock()
        async with self._opening:
            if self._conn is not None:
                return
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
            try:
                ws = await connect(self._url, additional_headers=headers, max_size=None, compression=None,
                                   open_timeout=self.timeout)
            except InvalidStatus as exc:
                status = exc.response.status_code
                code = {401: "unauthorized", 403: "forbidden"}.get(status, "connect_failed")
                raise ConnectionError(f"{self.url} refused the connection: HTTP {status}", code) from None
            except (OSError, asyncio.TimeoutError, InvalidURI) as exc:
                raise ConnectionError(f"cannot connect to {self.url}: {exc}", "connect_failed") from None
            named = ws.response.headers.get("X-Clap-Model") if ws.response is not None else None
            self.model = unquote(named) if named else None  # binary replies carry no model field: this names it
            self.reconnects += self._opened > 0
            self._opened += 1
            conn = self._conn = _Connection(ws)
            conn.reader = asyncio.create_task(self._read(conn))

    async def _read(self, conn: _Connection) -> None:
        ws = conn.ws
        try:
            async for message in ws:
                if not conn.fifo:
                    continue  # nothing was asked
                pending = conn.fifo.popleft()
                if pending.future.done():
                    continue  # timed out or cancelled: its late reply is dropped
                try:
                    pending.future.set_result(self._parse(pending, message))
                except ClapError as exc:
                    pending.future.set_exception(exc)
                except Exception as exc:  # a reply that does not parse fails its own call only
                    pending.future.set_exception(ClapError(f"unexpected reply: {exc}", "bad_reply", pending.id))
        except ConnectionClosed:
            pass
        finally:
            if self._conn is conn:
                self._conn = None
            self._fail(conn)

    def _fail(self, conn: _Connection) -> None:
        """Fail every call still waiting on ``conn``, which has ended."""
        ws = conn.ws
        reason = f"connection to {self.url} lost" + (f" ({ws.close_code} {ws.close_reason})".rstrip()
                                                      if ws.close_code else "")
        code = "closed" if self._closed else "connection_lost"
        while conn.fifo:
            pending = conn.fifo.popleft()
            if not pending.future.done():
                pending.future.set_exception(ConnectionError(reason, code, pending.id))

    @staticmethod
    def _parse(pending: _Pending, message: str | bytes) -> Any:
        if isinstance(message, bytes):
            return pending.parse(np.frombuffer(message, dtype="<f4").copy())
        reply = json.loads(message)
        if reply.get("status") == "ERROR":
            error = reply.get("error") or {}
            raise ClapError(error.get("message", "server error"), error.get("code", "error"), pending.id)
        if reply.get("id") not in (None, pending.id):
            raise ClapError(f"the reply to {reply.get('id')!r} came in place of {pending.id!r}", "out_of_order",
                            pending.id)
        return pending.parse(reply)

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with ConnectionError (code ``closed``)."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.ws.close()
            if conn.reader is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await conn.reader
            self._fail(conn)

    # ---- one call ------------------------------------------------------------------------------------
    async def request(self, message: Mapping[str, Any] | bytes, parse: Callable[[Any], Any] = lambda r: r, *,
                      op: str | None = None, timeout: float | None = None) -> Any:
        """Send one protocol message (a dict, or a binary frame) and return ``parse(reply)``.

        Raises :class:`ClapError` for an error reply, :class:`TimeoutError`, and :class:`ConnectionError` when the
        connection is lost and the op is not safe to repeat (or the retries are spent)."""
        op = op or (message.get("op", "embed") if isinstance(message, Mapping) else "embed")
        self._outstanding += 1
        try:
            return await self._attempts(message, parse, op, timeout)
        finally:
            self._outstanding -= 1

    async def _attempts(self, message: Mapping[str, Any] | bytes, parse: Callable[[Any], Any], op: str,
                        timeout: float | None) -> Any:
        attempts = 1 + (self.retries if op in IDEMPOTENT else 0)
        for attempt in range(attempts):
            try:
                return await self._once(message, parse, timeout if timeout is not None else self.timeout)
            except ConnectionError as exc:
                if self._closed or attempt == attempts - 1:
                    if op not in IDEMPOTENT and exc.code == "connection_lost":
                        exc.message += (f"; {op} is not repeated by the client, since the server may have applied "
                                        "it: check (archive_info, projection_info) before sending it again")
                    raise
                await asyncio.sleep(min(self.backoff[1], self.backoff[0] * 2**attempt))
        raise AssertionError("unreachable")

    async def _once(self, message: Mapping[str, Any] | bytes, parse: Callable[[Any], Any], timeout: float) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        async with self._room:
            try:
                await asyncio.wait_for(self._connect_with_backoff(deadline), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise ConnectionError(f"cannot connect to {self.url} within {timeout:g} s", "connect_failed") from None
            request_id = f"p{next(self._ids)}"
            pending = _Pending(request_id, loop.create_future(), parse)
            conn = self._conn
            if conn is None or conn.reader is None or conn.reader.done():
                raise ConnectionError(f"connection to {self.url} lost", request_id=request_id)
            conn.fifo.append(pending)
            try:
                if isinstance(message, bytes):
                    await conn.ws.send(message)
                else:
                    await conn.ws.send(json.dumps({**message, "id": request_id}))
            except ConnectionClosed:
                pass  # the reader fails it with the reason
            if conn.reader.done():  # it ended while this call was being sent: nobody else will fail it
                self._fail(conn)
            try:
                return await asyncio.wait_for(asyncio.shield(pending.future), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                pending.future.cancel()  # its late reply is dropped; the connection goes on
                raise TimeoutError(f"no reply within {timeout:g} s", request_id) from None

    async def _connect_with_backoff(self, deadline: float) -> None:
        delay = self.backoff[0]
        while True:
            try:
                return await self.connect()
            except ConnectionError as exc:
                if exc.code != "connect_failed" or asyncio.get_running_loop().time() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(self.backoff[1], delay * 2)

    # ---- the protocol's ops ----------------------------------------------------------------------------
    async def embed(self, audio: Any, sample_rate: float | None = None, *, timeout: float | None = None,
                    **extras: Any) -> Embedding:
        """Embed one sound (float samples, mono or ``(frames, channels)``, at ``sample_rate``, default the
        client's). ``extras``: the protocol's embed options (``prompts``, ``probs``, ``references``, ``top_k``,
        ``library``, ``tags``, ``archive``, ``k``, ``archive_add``, ``ids``, ``descriptor``, ``normalize``,
        ``long_clip``); asking for any of them makes the reply JSON."""
        samples, channels = as_audio(audio)
        rate = float(sample_rate or self.sample_rate)
        fields = self._fields(extras)
        if self.reply == "binary" and not fields and channels == 1 and rate == self.sample_rate:
            return await self.request(samples.tobytes(), lambda r: Embedding(r, self.model), op="embed",
                                      timeout=timeout)
        message = {"op": "embed", "audio_buffer": _b64(samples), "sample_rate": rate, "channels": channels,
                   **fields, "reply": self._reply_for(fields)}
        return await self.request(message, lambda r: _embedding(r, 0, False, self.model), timeout=timeout)

    async def embed_batch(self, audios: Sequence[Any], sample_rate: float | None = None, *,
                          timeout: float | None = None, **extras: Any) -> np.ndarray:
        """(N, 512) float32 embeddings of N sounds of one rate and channel count, in one message."""
        prepared = [as_audio(a, f"audios[{i}]") for i, a in enumerate(audios)]
        if not prepared:
            raise ValueError("audios is empty")
        if len({c for _, c in prepared}) != 1:
            raise ValueError("the sounds of one batch must have the same number of channels")
        fields = self._fields(extras)
        message = {"op": "embed_batch", "audio_buffers": [_b64(s) for s, _ in prepared],
                   "sample_rate": float(sample_rate or self.sample_rate), "channels": prepared[0][1], **fields,
                   "reply": self._reply_for(fields)}
        return await self.request(message, lambda r: _rows(r, "embeddings"), timeout=timeout)

    async def embed_batch_items(self, audios: Sequence[Any], sample_rate: float | None = None, *,
                                timeout: float | None = None, **extras: Any) -> list[Embedding]:
        """Like :meth:`embed_batch`, with each sound's extras (similarity, matches, novelty ...): JSON replies."""
        prepared = [as_audio(a, f"audios[{i}]") for i, a in enumerate(audios)]
        if not prepared:
            raise ValueError("audios is empty")
        message = {"op": "embed_batch", "audio_buffers": [_b64(s) for s, _ in prepared],
                   "sample_rate": float(sample_rate or self.sample_rate), "channels": prepared[0][1],
                   **self._fields(extras), "reply": "json"}
        return await self.request(message, lambda r: [_embedding(r, i, True) for i in range(r["count"])],
                                  timeout=timeout)

    async def embed_text(self, texts: Sequence[str] | str, *, timeout: float | None = None) -> np.ndarray:
        """(N, 512) float32 text embeddings, in the sounds' space."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) and t for t in texts):
            raise ValueError("texts must be one or more non-empty strings")
        return await self.request({"op": "embed_text", "texts": texts}, lambda r: _rows(r, "embeddings"),
                                  timeout=timeout)

    async def similarity(self, audio: Any, prompts: Sequence[str], sample_rate: float | None = None,
                         **extras: Any) -> dict[str, float]:
        """Cosine of one sound to each prompt: ``{prompt: cosine}``."""
        result = await self.embed(audio, sample_rate, prompts=list(prompts), **extras)
        assert result.similarity is not None
        return result.similarity

    async def search(self, text: str | None = None, audio: Any = None, embedding: Any = None, *,
                     item: tuple[str, int] | None = None, sample_rate: float | None = None,
                     timeout: float | None = None, page: bool = False, **options: Any) -> Any:
        """The loaded libraries' nearest items to a text, a sound, an embedding or a library item (text with one of
        the others blends them, ``alpha``), or browse by filters alone. ``options``: ``top_k``, ``offset``,
        ``tags``, ``library``, ``min_score``, ``min_duration``, ``max_duration``, ``alpha``. Returns the matches,
        or with ``page=True`` the whole page (``matches``, ``count``, ``offset``, ``more``, ``model``)."""
        message: dict[str, Any] = {"op": "search", **options}
        if text is not None:
            message["text"] = text
        if audio is not None:
            samples, channels = as_audio(audio)
            message.update(audio_buffer=_b64(samples), sample_rate=float(sample_rate or self.sample_rate),
                           channels=channels)
        if embedding is not None:
            message["embedding"] = as_vectors(embedding, "embedding")[0]
        if item is not None:
            message["item"] = {"library": item[0], "id": int(item[1])}
        return await self.request(message, (lambda r: r) if page else (lambda r: r["matches"]), timeout=timeout)

    async def libraries(self, *, timeout: float | None = None) -> list[dict]:
        return await self.request({"op": "libraries"}, lambda r: r["libraries"], timeout=timeout)

    def _archive_items(self, items: Any, audio: bool, sample_rate: float | None) -> dict[str, Any]:
        if audio:
            prepared = [as_audio(a, f"items[{i}]") for i, a in enumerate(items)]
            if not prepared:
                raise ValueError("items is empty")
            return {"audio_buffers": [_b64(s) for s, _ in prepared], "channels": prepared[0][1],
                    "sample_rate": float(sample_rate or self.sample_rate)}
        return {"embeddings": as_vectors(items)}

    async def archive_add(self, archive: str, items: Any, *, audio: bool = False, ids: Sequence[Any] | None = None,
                          sample_rate: float | None = None, timeout: float | None = None) -> dict:
        """Add embeddings ((n, 512)) or, with ``audio=True``, sounds to a named archive: ``{added, count}``."""
        message = {"op": "archive_add", "archive": archive, **self._archive_items(items, audio, sample_rate)}
        if ids is not None:
            message["ids"] = list(ids)
        return await self.request(message, lambda r: {"added": r["added"], "count": r["count"]}, timeout=timeout)

    async def novelty(self, archive: str, items: Any, *, k: int = 15, audio: bool = False,
                      sample_rate: float | None = None, timeout: float | None = None) -> np.ndarray:
        """Each item's novelty against the archive (mean cosine distance to its ``k`` nearest), as an array."""
        message = {"op": "novelty", "archive": archive, "k": k, **self._archive_items(items, audio, sample_rate)}
        return await self.request(message, lambda r: np.asarray(r["novelty"], dtype=np.float64), timeout=timeout)

    async def archive_search(self, archive: str, items: Any, *, top_k: int = 10, audio: bool = False,
                             sample_rate: float | None = None, timeout: float | None = None) -> list[list[dict]]:
        """The nearest archived items of each query: ``[[{id, score}, ...], ...]``."""
        message = {"op": "archive_search", "archive": archive, "top_k": top_k,
                   **self._archive_items(items, audio, sample_rate)}
        return await self.request(message, lambda r: r["matches"], timeout=timeout)

    async def archive_info(self, archive: str | None = None, *, timeout: float | None = None) -> dict:
        message = {"op": "archive_info", **({"archive": archive} if archive else {})}
        return await self.request(message, _body, timeout=timeout)

    async def archive_drop(self, archive: str, *, timeout: float | None = None) -> bool:
        return await self.request({"op": "archive_drop", "archive": archive}, lambda r: bool(r["dropped"]),
                                  timeout=timeout)

    async def fit_projection(self, archive: str, *, timeout: float | None = None, **options: Any) -> dict:
        """Start fitting behaviour descriptors on an archive (``dims``, ``method``, ``hidden``, ``epochs``,
        ``seed``, ``triplets``); returns at once, :meth:`projection_info` says when it is installed."""
        return await self.request({"op": "projection_fit", "archive": archive, **options}, _body, timeout=timeout)

    async def projection_info(self, *, timeout: float | None = None) -> dict:
        return await self.request({"op": "projection_info"}, _body, timeout=timeout)

    async def info(self, *, timeout: float | None = None) -> dict:
        """The server's model, precision, CPU class, queue and counters."""
        return await self.request({"op": "info"}, _body, timeout=timeout)

    # ---- helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _fields(extras: Mapping[str, Any]) -> dict[str, Any]:
        allowed = _SCORING + ("normalize", "long_clip")
        unknown = sorted(set(extras) - set(allowed))
        if unknown:
            raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(allowed)}")
        fields = {k: v for k, v in extras.items() if v is not None}
        if "references" in fields:
            fields["references"] = as_vectors(fields["references"], "references")
        return fields

    def _reply_for(self, fields: Mapping[str, Any]) -> str:
        return "json" if self.reply == "json" or any(k in fields for k in _SCORING) else "binary"


def _body(reply: dict) -> dict:
    return {k: v for k, v in reply.items() if k not in ("status", "id", "op")}


def _rows(reply: Any, key: str) -> np.ndarray:
    if isinstance(reply, np.ndarray):
        return reply.reshape(-1, DIM)
    return np.asarray(reply[key], dtype=np.float32).reshape(-1, DIM)


def _embedding(reply: Any, i: int, batch: bool, model: str | None = None) -> Embedding:
    if isinstance(reply, np.ndarray):  # a bare binary reply: the model is the one the handshake named
        return Embedding(reply.reshape(-1, DIM)[i], model)
    vector = np.asarray(reply["embeddings"][i] if batch else reply["embedding"], dtype=np.float32)

    def pick(key: str) -> Any:
        value = reply.get(key)
        return value[i] if batch and isinstance(value, list) else value

    timing = {k: reply[k] for k in ("time", "queue_ms", "model_ms") if k in reply}
    return Embedding(vector, reply.get("model"), pick("cached"), pick("similarity"), pick("probs"),
                     pick("reference_similarity"), pick("matches"), pick("novelty"), pick("archive_count"),
                     pick("behavior_descriptor"), pick("projection_version"), list(pick("warnings") or []), timing)
