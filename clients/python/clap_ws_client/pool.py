"""AsyncClapPool: calls spread over several clap-ws replicas, with failover.

Each call goes to the replica with the fewest calls in flight (or round
robin). A replica whose connection fails, or that answers ``shutting_down``
(draining), is taken out for ``down_for`` seconds, and the call goes to
another: at once for calls that never reached it (``connect_failed``,
``busy``, ``shutting_down``), and, for calls lost in flight, only where they
are safe to repeat (embeddings, searches, reads). Archives live on one
replica: every call naming an archive goes to that archive's home (a stable
hash of its name over the replicas up), so novelty is measured against
everything the run added.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np

from .client import IDEMPOTENT, AsyncClapClient, Embedding
from .errors import ClapError, ConnectionError

T = TypeVar("T")
NOT_SENT = frozenset({"connect_failed", "busy", "shutting_down"})  # refused before any work: safe anywhere
DOWN = frozenset({"connection_lost", "connect_failed", "shutting_down"})


class AsyncClapPool:
    """``async with AsyncClapPool([url1, url2]) as pool: await pool.embed(...)``; the calls of AsyncClapClient.

    ``strategy``: ``"least-pending"`` or ``"round-robin"``. ``down_for``: seconds a failed replica is left out.
    Other keywords go to each replica's :class:`AsyncClapClient` (``token``, ``timeout``, ``reply`` ...).
    """

    def __init__(self, urls: Sequence[str], *, strategy: str = "least-pending", down_for: float = 5.0,
                 **client_options: Any):
        if not urls:
            raise ValueError("a pool needs at least one server URL")
        if strategy not in ("least-pending", "round-robin"):
            raise ValueError(f"unknown strategy {strategy!r}: least-pending or round-robin")
        self.strategy, self.down_for = strategy, down_for
        self.clients = [AsyncClapClient(url, retries=0, **client_options) for url in urls]  # the pool fails over
        self._down_until = [0.0] * len(self.clients)
        self._next = 0

    async def __aenter__(self) -> AsyncClapPool:
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open every connection; ConnectionError only if none opens."""
        results = await asyncio.gather(*(c.connect() for c in self.clients), return_exceptions=True)
        for i, result in enumerate(results):
            if isinstance(result, BaseException):
                self._down_until[i] = time.monotonic() + self.down_for
        if all(isinstance(r, BaseException) for r in results):
            raise ConnectionError("no server of the pool could be reached", "connect_failed")

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self.clients))

    @property
    def pending(self) -> int:
        return sum(c.pending for c in self.clients)

    @property
    def healthy(self) -> list[AsyncClapClient]:
        """The replicas not taken out."""
        now = time.monotonic()
        return [c for c, until in zip(self.clients, self._down_until) if until <= now]

    def _pick(self, exclude: AsyncClapClient | None = None) -> AsyncClapClient | None:
        up = [c for c in self.healthy if c is not exclude]
        candidates = up or [c for c in self.clients if c is not exclude]
        if not candidates:
            return None
        if self.strategy == "round-robin":
            self._next += 1
            return candidates[self._next % len(candidates)]
        return min(candidates, key=lambda c: c.pending)

    def home(self, archive: str) -> AsyncClapClient:
        """The replica that keeps ``archive``: a stable hash of the name over the replicas up (all, if none is)."""
        candidates = self.healthy or self.clients
        return candidates[zlib.crc32(archive.encode()) % len(candidates)]

    async def _run(self, op: str, call: Callable[[AsyncClapClient], Awaitable[T]],
                   archive: str | None = None) -> T:
        first = self.home(archive) if archive else self._pick()
        assert first is not None
        try:
            return await call(first)
        except ClapError as error:
            if error.code in DOWN:
                self._down_until[self.clients.index(first)] = time.monotonic() + self.down_for
            safe = error.code in NOT_SENT or (error.code == "connection_lost" and op in IDEMPOTENT)
            if not safe:
                raise
            second = self.home(archive) if archive else self._pick(exclude=first)
            if second is None or second is first:
                raise
            return await call(second)  # once, elsewhere

    # ---- the calls ------------------------------------------------------------------------------------
    async def embed(self, audio: Any, sample_rate: float | None = None, **extras: Any) -> Embedding:
        op = "archive_add" if extras.get("archive_add") else "embed"
        return await self._run(op, lambda c: c.embed(audio, sample_rate, **extras), extras.get("archive"))

    async def embed_batch(self, audios: Sequence[Any], sample_rate: float | None = None, **extras: Any) -> np.ndarray:
        op = "archive_add" if extras.get("archive_add") else "embed_batch"
        return await self._run(op, lambda c: c.embed_batch(audios, sample_rate, **extras), extras.get("archive"))

    async def embed_batch_items(self, audios: Sequence[Any], sample_rate: float | None = None,
                                **extras: Any) -> list[Embedding]:
        op = "archive_add" if extras.get("archive_add") else "embed_batch"
        return await self._run(op, lambda c: c.embed_batch_items(audios, sample_rate, **extras),
                               extras.get("archive"))

    async def embed_text(self, texts: Sequence[str] | str, **kw: Any) -> np.ndarray:
        return await self._run("embed_text", lambda c: c.embed_text(texts, **kw))

    async def similarity(self, audio: Any, prompts: Sequence[str], sample_rate: float | None = None,
                         **extras: Any) -> dict[str, float]:
        return await self._run("embed", lambda c: c.similarity(audio, prompts, sample_rate, **extras))

    async def search(self, text: str | None = None, audio: Any = None, embedding: Any = None,
                     **options: Any) -> Any:
        return await self._run("search", lambda c: c.search(text, audio, embedding, **options))

    async def libraries(self, **kw: Any) -> list[dict]:
        return await self._run("libraries", lambda c: c.libraries(**kw))

    async def archive_add(self, archive: str, items: Any, **kw: Any) -> dict:
        return await self._run("archive_add", lambda c: c.archive_add(archive, items, **kw), archive)

    async def novelty(self, archive: str, items: Any, **kw: Any) -> np.ndarray:
        return await self._run("novelty", lambda c: c.novelty(archive, items, **kw), archive)

    async def archive_search(self, archive: str, items: Any, **kw: Any) -> list[list[dict]]:
        return await self._run("archive_search", lambda c: c.archive_search(archive, items, **kw), archive)

    async def archive_info(self, archive: str | None = None, **kw: Any) -> dict:
        return await self._run("archive_info", lambda c: c.archive_info(archive, **kw), archive)

    async def archive_drop(self, archive: str, **kw: Any) -> bool:
        return await self._run("archive_drop", lambda c: c.archive_drop(archive, **kw), archive)

    async def fit_projection(self, archive: str, **options: Any) -> dict:
        return await self._run("projection_fit", lambda c: c.fit_projection(archive, **options), archive)

    async def projection_info(self, archive: str | None = None, **kw: Any) -> dict:
        """The projection of ``archive``'s home replica (where :meth:`fit_projection` on it ran), or of any."""
        return await self._run("projection_info", lambda c: c.projection_info(**kw), archive)

    async def info(self, **kw: Any) -> list[dict]:
        """Every replica's ``info``: ``{"url", "error": "down"}`` for one taken out (not asked), ``{"url",
        "error": CODE}`` for one that fails now (and is taken out)."""
        async def one(i: int, client: AsyncClapClient) -> dict:
            if self._down_until[i] > time.monotonic():
                return {"url": client.url, "error": "down"}
            try:
                return {"url": client.url, **await client.info(**kw)}
            except ClapError as error:
                if error.code in DOWN or isinstance(error, ConnectionError):
                    self._down_until[i] = time.monotonic() + self.down_for
                return {"url": client.url, "error": error.code}

        return list(await asyncio.gather(*(one(i, c) for i, c in enumerate(self.clients))))
