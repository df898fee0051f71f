"""Each sound and text embedded once: from the cache, from a job already in flight, or by a new job.

One rule for both: a request *claims* the in-flight rows it will wait for
when it asks (not when it gets round to awaiting them), and a job is
withdrawn once no claim on any of its rows is left (a job the model already
runs finishes, and its rows are cached for whoever asks next). So a client that leaves
cancels the work nobody else waits for, and never work another request still
needs. The model work itself is the caller's (a job from
:class:`~clap_ws.batching.MicroBatcher`); this module only shares it. Runs on
the event loop; not thread-safe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from .errors import ClapError
from .similarity import EmbeddingCache


class Computed:
    """Values by key, computed once, kept in ``cache`` as ``(vector, meta)`` entries.

    ``meta`` travels with a key (a sound's warnings) and comes back on every hit, cached or in flight.
    """

    def __init__(self, cache: EmbeddingCache, what: str, withdraw: Callable[[asyncio.Future], Any] | None = None):
        self.cache = cache
        # how to give up a job nobody waits for: the batcher's withdraw (only while it is queued), or cancel
        self._withdraw = withdraw or (lambda job: job.cancel())
        self.what = what  # "audio" or "text", for the error a cancelled job leaves behind
        self._flying: dict[Hashable, tuple[asyncio.Future, Any]] = {}  # key -> (row, meta)
        self._job_of: dict[asyncio.Future, asyncio.Future] = {}  # row -> the job computing it
        self._claims: dict[asyncio.Future, int] = {}  # job -> claims on its rows

    def find(self, key: Hashable, *, count: bool = True) -> tuple[Any, Any] | None:
        """``(vector, meta)`` from the cache, ``(row future, meta)`` while in flight, or None.
        ``count``: whether a cache lookup counts as a hit or a miss."""
        cached = self.cache.get(key) if count else self.cache.peek(key)
        return cached if cached is not None else self._flying.get(key)

    def flying(self, key: Hashable) -> bool:
        return key in self._flying

    def start(self, job: asyncio.Future, keys: Sequence[Hashable], metas: Sequence[Any],
              rows_of: Callable[[Any], Sequence[tuple[Any, Any]]], share: bool = True) -> list[asyncio.Future]:
        """Row futures for ``keys``, computed by ``job``; ``rows_of(job result)`` gives each key's ``(vector,
        extra)``, which its row resolves to. With ``share``, :meth:`find` hands the rows to other requests
        until the job settles; the vectors are then cached with their metas."""
        loop = asyncio.get_running_loop()
        rows = [loop.create_future() for _ in keys]
        for key, meta, row in zip(keys, metas, rows):
            self._job_of[row] = job
            if share:
                self._flying[key] = (row, meta)

        def settle(job: asyncio.Future) -> None:
            error = ClapError(f"the {self.what} job was cancelled") if job.cancelled() else job.exception()
            values = rows_of(job.result()) if error is None else None
            self._claims.pop(job, None)
            for n, (key, meta, row) in enumerate(zip(keys, metas, rows)):
                self._job_of.pop(row, None)
                if share and self._flying.get(key, (None,))[0] is row:
                    del self._flying[key]
                if values is None:
                    assert error is not None
                    row.set_exception(error)
                    row.add_done_callback(lambda r: r.exception())  # nobody may be waiting any more
                else:
                    if share:
                        self.cache.store([key], [(values[n][0], meta)])
                    row.set_result(values[n])

        job.add_done_callback(settle)
        return rows

    def wait(self, rows: Sequence[Any]) -> asyncio.Task:
        """Claim the row futures among ``rows`` now; the task yields every row's value (futures awaited,
        anything else as it is). Cancelling the task releases the claims, cancelling jobs nobody else claims."""
        jobs = [self._job_of[r] for r in {r for r in rows if isinstance(r, asyncio.Future)} if r in self._job_of]
        for job in jobs:
            self._claims[job] = self._claims.get(job, 0) + 1
        task = asyncio.ensure_future(self._gather(rows, jobs))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read by the request, if still there
        return task

    async def _gather(self, rows: Sequence[Any], jobs: list[asyncio.Future]) -> list[Any]:
        try:
            return [await asyncio.shield(r) if isinstance(r, asyncio.Future) else r for r in rows]
        finally:
            for job in jobs:
                left = self._claims.get(job, 0) - 1
                if left > 0:
                    self._claims[job] = left
                elif self._claims.pop(job, None) is not None and not job.done():
                    self._withdraw(job)  # every request that asked for its rows has gone
