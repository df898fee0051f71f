"""Micro-batching: many callers on an event loop, one worker thread, one model.

:class:`MicroBatcher` is the one place that knows about batching, in the
spirit of Ray Serve's ``@serve.batch``: it has two knobs, ``max_batch`` and
``max_wait_ms``, and a handler that maps a list of items to a list of
results. Callers on the asyncio loop :meth:`~MicroBatcher.submit` an item and
await a future; a single worker thread takes whatever is pending (up to
``max_batch``), waits at most ``max_wait_ms`` for more, calls the handler,
and settles the futures back on the loop. The loop never runs the model.

Batches form without waiting: while the model runs, new requests queue, and
the worker takes all of them (up to ``max_batch``) when it is free. The
default ``max_wait_ms`` is therefore 0; a wait only adds latency when the
model is idle (``docs/experiments.md``). Raise it where a batch costs little
more than one item (a GPU) and clients arrive in bursts.

Why a thread: torch releases the GIL in its kernels, a thread shares the
resident model without copying it, and one worker serialises access to it.
Every model call, the warm-up included (``on_start``), happens on that one
thread: torch's OpenMP pool is per calling thread, and a second pool left
spinning on a 2-core machine slows the first.

Bounded by design: past ``max_queue`` pending items :meth:`submit` raises
:class:`~clap_ws.errors.Busy` at once instead of letting memory grow. A
future cancelled before its batch starts (the client went away) is dropped
without running. A handler exception fails only that batch's futures.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import Busy, ClapError, ErrorCode

T = TypeVar("T")
R = TypeVar("R")
_log = logging.getLogger(__name__)


@dataclass
class _Pending(Generic[T]):
    item: T
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class MicroBatcher(Generic[T, R]):
    """Collects items from any number of coroutines into batches for one worker."""

    def __init__(
        self,
        handler: Callable[[list[T]], Sequence[R]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        name: str = "clap-inference",
        on_start: Callable[[], object] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_ms >= 0")
        self.handler = handler
        self.on_start = on_start  # runs on the worker thread before its first batch
        self.ready = threading.Event()
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.name = name
        self.batches = 0  # handler calls
        self.items = 0  # items handed to the handler
        self.dropped = 0  # items whose caller had gone before their batch
        self._queue: collections.deque[_Pending[T]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- caller side (event loop thread) --------------------------------
    def submit(self, item: T) -> asyncio.Future:
        """Queue ``item``; the returned future resolves to the handler's result for it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._stopping:
                raise ClapError("the inference worker is stopping", code=ErrorCode.SHUTTING_DOWN)
            if len(self._queue) >= self.max_queue:
                raise Busy(f"the inference queue is full ({self.max_queue} requests waiting); retry shortly")
            self._queue.append(_Pending(item, future, loop))
            self._cond.notify()
        return future

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Start (or restart, after a crash) the worker thread."""
        if self.alive:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then end the worker thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- worker side ------------------------------------------------------
    def _take(self) -> list[_Pending[T]] | None:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while len(self._queue) < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            n = min(self.max_batch, len(self._queue))
            return [self._queue.popleft() for _ in range(n)]

    def _run(self) -> None:
        if self.on_start is not None and not self.ready.is_set():
            try:
                self.on_start()
            except Exception:
                _log.exception("worker start-up hook failed")
        self.ready.set()
        while (batch := self._take()) is not None:
            live = [p for p in batch if not p.future.cancelled()]
            self.dropped += len(batch) - len(live)
            if live:
                self._process(live)

    def _process(self, batch: list[_Pending[T]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            results = list(self.handler([p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"handler returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # one bad batch must not end the worker
            _log.exception("inference batch of %d failed", len(batch))
            error = exc if isinstance(exc, ClapError) else ClapError(f"inference failed: {exc}")
            for p in batch:
                self._reply(p, None, error)
            return
        except BaseException:  # the worker thread is dying: its batch must not hang
            for p in batch:
                self._reply(p, None, ClapError("the inference worker died; it is being restarted"))
            raise
        for p, result in zip(batch, results):
            if isinstance(result, BaseException):
                self._reply(p, None, result)
            else:
                self._reply(p, result, None)

    @staticmethod
    def _reply(p: _Pending, result, error: BaseException | None) -> None:
        try:
            p.loop.call_soon_threadsafe(_settle, p.future, result, error)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass
