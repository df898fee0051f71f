"""Micro-batching: many callers on an event loop, one worker thread, one model.

:class:`MicroBatcher` is the one place that knows about batching, in the
spirit of Ray Serve's ``@serve.batch``: it has two knobs, ``max_batch`` and
``max_wait_ms``, a latency target ``max_batch_ms``, and a handler that maps a list of items to their results
(a list, or an iterator whose results are settled as they come, so the first
items of a long batch need not wait for the last). Callers on the asyncio loop :meth:`~MicroBatcher.submit` an item and
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

Fair by design: each item is queued under its caller's ``key`` (a
connection), and a batch takes one item from each waiting caller in turn, so
a caller with one item in flight waits about one batch whatever another has
queued. Short batches: a batch holds the work that fits in ``max_batch_ms``
at the cost per unit the worker observes (a running average over past batches), or one
turn of every waiting caller if that is more, so a newcomer waits for a short
batch in progress and rides the next; equal callers still share one batch.
One caller alone gets short batches too: a long one in progress is what a
newcomer would wait for (figures: ``docs/performance.md``).

Bounded by design: the queue holds at most ``max_queue`` units of
``cost`` (the server counts 10-s windows and texts, the work a request buys),
and past that :meth:`submit` raises :class:`~clap_ws.errors.Busy` at once; an
item costing more than the whole queue can hold is ``too_many_items``. A
future cancelled before its batch starts (the client went away) leaves the
queue at once and never runs. A handler exception fails only that batch's futures.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterable
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
    cost: int = 1


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
        handler: Callable[[list[T]], Iterable[R]],
        *,
        max_batch: int = 32,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        max_batch_ms: float = 0.0,
        name: str = "clap-inference",
        on_start: Callable[[], object] | None = None,
    ):
        if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or max_batch_ms < 0:
            raise ValueError("max_batch and max_queue must be >= 1, max_wait_ms and max_batch_ms >= 0")
        self.handler = handler
        self.on_start = on_start  # runs on the worker thread before its first batch
        self.ready = threading.Event()
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_batch_ms = max_batch_ms  # 0: no latency target, batches of up to max_batch
        self.ms_per_unit: float | None = None  # measured: running average of batch time per unit of cost
        self.name = name
        self.batches = 0  # handler calls
        self.items = 0  # items handed to the handler
        self.dropped = 0  # items whose caller had gone before their batch
        self._queues: dict[Hashable, collections.deque[_Pending[T]]] = {}  # per caller, in arrival order
        self._depth = 0  # items queued
        self._load = 0  # their cost
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- caller side (event loop thread) --------------------------------
    def submit(self, item: T, *, key: Hashable = None, cost: int = 1) -> asyncio.Future:
        """Queue ``item`` for the caller ``key``; the future resolves to the handler's result for it.

        Raises :class:`~clap_ws.errors.Busy` when ``cost`` does not fit in
        what is left of ``max_queue``, and ``too_many_items`` when it exceeds
        ``max_queue`` itself (it would never fit).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        cost = max(1, int(cost))
        if cost > self.max_queue:
            raise ClapError(f"this request is {cost} units of work (10-s windows and texts); the server queues at "
                            f"most {self.max_queue}: send it in parts", code=ErrorCode.TOO_MANY_ITEMS)
        with self._cond:
            if self._stopping:
                raise ClapError("the inference worker is stopping", code=ErrorCode.SHUTTING_DOWN)
            if self._load + cost > self.max_queue:
                raise Busy(f"the inference queue is full ({self._load} of {self.max_queue} units of work "
                           f"waiting, this request needs {cost}); retry shortly")
            pending = _Pending(item, future, loop, cost)
            self._queues.setdefault(key, collections.deque()).append(pending)
            self._depth += 1
            self._load += cost
            self._cond.notify()
        future.add_done_callback(lambda f: self._withdraw(key, pending) if f.cancelled() else None)
        return future

    def withdraw(self, future: asyncio.Future) -> bool:
        """Take ``future``'s item out of the queue now and cancel it, if the worker has not taken it yet; whether
        it was. An item already in a batch runs to the end (stopping it would save nothing), and its result stands."""
        with self._cond:
            found = next(((key, p) for key, queue in self._queues.items() for p in queue if p.future is future), None)
        if found is None or not self._withdraw(*found):  # the worker may have taken it in between
            return False
        future.cancel()  # its done callback finds nothing left to take out
        return True

    def _withdraw(self, key: Hashable, pending: _Pending[T]) -> bool:
        """Take a cancelled item out of the queue at once, so its cost frees room for others now rather than
        when the worker reaches it (a client gone with a full pipeline must not keep the queue full)."""
        with self._cond:
            queue = self._queues.get(key)
            at = next((i for i, p in enumerate(queue) if p is pending), None) if queue else None
            if queue is None or at is None:
                return False  # already taken by the worker
            del queue[at]
            if not queue:
                del self._queues[key]
            self._depth -= 1
            self._load -= pending.cost
            self.dropped += 1
            return True

    @property
    def depth(self) -> int:
        """Items queued."""
        return self._depth

    @property
    def load(self) -> int:
        """Units of work queued (what ``max_queue`` bounds)."""
        return self._load

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
            while not self._depth:
                if self._stopping:
                    return None
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait
            while self._depth < self.max_batch and not self._stopping:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            budget = self._budget()
            batch: list[_Pending[T]] = []
            cost = 0
            full = False
            while not full and self._queues:  # round-robin: one per caller per turn
                for key in list(self._queues):
                    if batch and cost + self._queues[key][0].cost > budget:
                        full = True
                        break
                    queue = self._queues.pop(key)
                    pending = queue.popleft()
                    batch.append(pending)
                    cost += pending.cost
                    if queue:  # to the back of the line, so callers beyond the batch get the next one
                        self._queues[key] = queue
                    if len(batch) == self.max_batch:
                        full = True
                        break
            self._depth -= len(batch)
            self._load -= cost
            return batch

    def _budget(self) -> float:
        """Units of cost the next batch may hold: what fits in ``max_batch_ms`` at the observed cost per unit,
        but never less than one turn of every waiting caller, so equal callers lose nothing to the target;
        unbounded without a target or before the first measurement."""
        if not self.max_batch_ms or self.ms_per_unit is None:
            return float("inf")
        turn = sum(queue[0].cost for queue in self._queues.values())
        return max(1.0, turn, self.max_batch_ms / self.ms_per_unit)

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
        started = time.perf_counter()
        answered = 0  # results are settled as the handler yields them: the first items need not wait for the last
        try:
            for result in self.handler([p.item for p in batch]):
                if answered == len(batch):
                    raise RuntimeError(f"handler returned more results than the {len(batch)} items")
                if isinstance(result, BaseException):
                    self._reply(batch[answered], None, result)
                else:
                    self._reply(batch[answered], result, None)
                answered += 1
            if answered != len(batch):
                raise RuntimeError(f"handler returned {answered} results for {len(batch)} items")
            per_unit = (time.perf_counter() - started) * 1000 / sum(p.cost for p in batch)
            self.ms_per_unit = per_unit if self.ms_per_unit is None else 0.8 * self.ms_per_unit + 0.2 * per_unit
        except Exception as exc:  # one bad batch must not end the worker
            _log.exception("inference batch of %d failed", len(batch))
            error = exc if isinstance(exc, ClapError) else ClapError(f"inference failed: {exc}")
            for p in batch[answered:]:
                self._reply(p, None, error)
        except BaseException:  # the worker thread is dying: its batch must not hang
            for p in batch[answered:]:
                self._reply(p, None, ClapError("the inference worker died; it is being restarted"))
            raise

    @staticmethod
    def _reply(p: _Pending, result, error: BaseException | None) -> None:
        try:
            p.loop.call_soon_threadsafe(_settle, p.future, result, error)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass
