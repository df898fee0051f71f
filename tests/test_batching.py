"""MicroBatcher on its own: its two knobs, its bound, and what it does with failures."""

import asyncio
import contextlib
import threading

import pytest

from clap_ws.batching import MicroBatcher
from clap_ws.errors import Busy, ClapError


class Recorder:
    """A handler that records each batch and can be held back, to make batches form on purpose."""

    def __init__(self, fail_on=None):
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set once a batch is inside the handler
        self.fail_on = fail_on

    def __call__(self, items):
        self.entered.set()
        self.gate.wait(10)
        self.batches.append(list(items))
        if self.fail_on is not None and self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [i * 10 for i in items]


@contextlib.asynccontextmanager
async def running(handler, **knobs):
    batcher = MicroBatcher(handler, **knobs)
    batcher.start()
    await asyncio.get_running_loop().run_in_executor(None, batcher.ready.wait, 10)
    try:
        yield batcher
    finally:
        batcher.stop(5)


async def test_requests_queued_while_the_model_is_busy_form_one_batch_without_waiting():
    handler = Recorder()
    async with running(handler, max_batch=8, max_wait_ms=0) as batcher:
        handler.gate.clear()
        first = batcher.submit(0)
        assert await asyncio.to_thread(handler.entered.wait, 10)  # the worker holds item 0 in the handler
        rest = [batcher.submit(i) for i in range(1, 12)]
        handler.gate.set()
        assert await asyncio.gather(first, *rest) == [i * 10 for i in range(12)]
        assert handler.batches == [[0], list(range(1, 9)), list(range(9, 12))]  # FIFO, at most max_batch
        assert (batcher.batches, batcher.items) == (3, 12)


async def test_max_wait_gathers_requests_that_arrive_close_together():
    handler = Recorder()
    async with running(handler, max_batch=4, max_wait_ms=300) as batcher:
        futures = []
        for i in range(4):
            futures.append(batcher.submit(i))
            await asyncio.sleep(0.02)
        assert await asyncio.gather(*futures) == [0, 10, 20, 30]
        assert handler.batches == [[0, 1, 2, 3]]  # a full batch goes at once, not after 300 ms


async def test_full_queue_is_busy_at_once_and_nothing_queued_is_lost():
    handler = Recorder()
    async with running(handler, max_batch=2, max_queue=3) as batcher:
        handler.gate.clear()
        held = batcher.submit(0)
        assert await asyncio.to_thread(handler.entered.wait, 10)  # item 0 is held in the handler
        queued = [batcher.submit(i) for i in (1, 2, 3)]
        with pytest.raises(Busy, match="queue is full"):
            batcher.submit(4)
        handler.gate.set()
        assert await asyncio.gather(held, *queued) == [0, 10, 20, 30]


async def test_a_failing_batch_fails_only_its_own_items_and_a_cancelled_item_is_not_run():
    handler = Recorder(fail_on=2)
    async with running(handler, max_batch=2) as batcher:
        handler.gate.clear()
        held = batcher.submit(0)
        assert await asyncio.to_thread(handler.entered.wait, 10)  # item 0 is held in the handler
        bad = [batcher.submit(1), batcher.submit(2)]
        gone = batcher.submit(3)
        good = batcher.submit(4)
        gone.cancel()
        handler.gate.set()
        assert await held == 0
        for future in bad:
            with pytest.raises(ClapError, match="bad item 2"):
                await future
        assert await good == 40
        assert [3] not in handler.batches and all(3 not in b for b in handler.batches)
        assert batcher.dropped == 1 and batcher.alive


async def test_stop_finishes_what_is_queued_then_refuses():
    handler = Recorder()
    batcher = MicroBatcher(handler, max_batch=1)
    batcher.start()
    handler.gate.clear()
    futures = [batcher.submit(i) for i in range(3)]
    handler.gate.set()
    await asyncio.get_running_loop().run_in_executor(None, batcher.stop, 5)
    assert await asyncio.gather(*futures) == [0, 10, 20]
    with pytest.raises(ClapError, match="stopping"):
        batcher.submit(9)


def test_invalid_knobs_are_rejected():
    for kwargs in ({"max_batch": 0}, {"max_queue": 0}, {"max_wait_ms": -1}):
        with pytest.raises(ValueError):
            MicroBatcher(lambda items: items, **kwargs)


async def test_a_polite_caller_waits_one_batch_whatever_a_greedy_one_has_queued():
    """Round-robin across callers: 64 items of one connection do not delay another's one item past a batch."""
    handler = Recorder()
    async with running(handler, max_batch=4, max_wait_ms=0) as batcher:
        handler.gate.clear()
        first = batcher.submit(-1, key="greedy")
        assert await asyncio.to_thread(handler.entered.wait, 10)  # the worker is busy with item -1
        greedy = [batcher.submit(i, key="greedy") for i in range(64)]
        polite = batcher.submit(1000, key="polite")
        handler.gate.set()
        await asyncio.gather(first, polite, *greedy)
        assert 1000 in handler.batches[1]  # the very next batch, not the seventeenth
        assert [i for b in handler.batches for i in b if i < 1000] == list(range(-1, 64))  # each caller FIFO


async def test_callers_beyond_max_batch_take_turns_across_batches():
    handler = Recorder()
    async with running(handler, max_batch=2, max_wait_ms=0) as batcher:
        handler.gate.clear()
        first = batcher.submit(-1, key="x")
        assert await asyncio.to_thread(handler.entered.wait, 10)
        futures = [batcher.submit(10 * c + i, key=c) for i in range(3) for c in range(3)]  # 3 callers, 3 each
        handler.gate.set()
        await asyncio.gather(first, *futures)
        served = [sorted(i // 10 for i in b) for b in handler.batches[1:]]
        assert served == [[0, 1], [0, 2], [1, 2], [0, 1], [2]]  # a caller served goes to the back of the line


async def test_admission_counts_work_not_requests():
    handler = Recorder()
    async with running(handler, max_batch=4, max_queue=10) as batcher:
        handler.gate.clear()
        first = batcher.submit(0, cost=1)
        assert await asyncio.to_thread(handler.entered.wait, 10)
        big = batcher.submit(1, key="a", cost=8)
        with pytest.raises(Busy, match="8 of 10 units"):
            batcher.submit(2, key="b", cost=3)  # 8 + 3 > 10
        small = batcher.submit(3, key="b", cost=2)  # 8 + 2 fits
        with pytest.raises(ClapError) as info:
            batcher.submit(4, key="c", cost=11)  # would never fit
        assert info.value.code == "too_many_items" and batcher.load == 10
        handler.gate.set()
        assert await asyncio.gather(first, big, small) == [0, 10, 30]
        assert batcher.load == 0 and batcher.depth == 0


async def test_withdraw_takes_a_queued_item_out_at_once_but_lets_a_running_one_finish():
    rec = Recorder()
    rec.gate.clear()
    async with running(rec, max_batch=1, max_queue=10) as b:
        running_item = b.submit(1, key="a", cost=3)
        await asyncio.get_running_loop().run_in_executor(None, rec.entered.wait, 10)  # item 1 is in the handler
        queued = b.submit(2, key="b", cost=4)
        assert b.load == 4
        assert b.withdraw(running_item) is False and not running_item.cancelled()
        assert b.withdraw(queued) is True and queued.cancelled()
        assert b.load == 0 and b.depth == 0 and b.dropped == 1  # its room is free now, not when the worker gets there
        rec.gate.set()
        assert await asyncio.wait_for(running_item, 10) == 10  # the running one's result stands
    assert rec.batches == [[1]]


class Timed(Recorder):
    """A handler that takes ``ms`` per item, like a model whose cost grows with the batch."""

    def __init__(self, ms: float):
        super().__init__()
        self.ms = ms

    def __call__(self, items):
        import time

        time.sleep(self.ms * len(items) / 1000)
        return super().__call__(items)


async def test_batches_are_sized_from_the_latency_target_and_the_measured_cost():
    """max_batch_ms with 20 ms per item: 3 items per batch for a caller alone or two callers, so a newcomer rides
    the very next short batch; 8 equal callers still share one batch (one turn of everyone waiting)."""
    handler = Timed(20)
    async with running(handler, max_batch=32, max_batch_ms=60) as batcher:
        await batcher.submit(-1, key="greedy")  # the first batch measures the cost per item
        assert batcher.ms_per_unit == pytest.approx(20, abs=15)
        handler.gate.clear()
        handler.entered.clear()
        first = batcher.submit(-2, key="greedy")
        assert await asyncio.to_thread(handler.entered.wait, 10)
        greedy = [batcher.submit(i, key="greedy") for i in range(12)]
        polite = batcher.submit(1000, key="polite")
        handler.gate.set()
        await asyncio.gather(first, polite, *greedy)
        sizes = [len(b) for b in handler.batches[2:]]
        assert 1000 in handler.batches[2] and max(sizes) <= 4 and len(sizes) >= 4
        handler.batches.clear()
        handler.gate.clear()
        handler.entered.clear()
        first = batcher.submit(-3, key="x")
        assert await asyncio.to_thread(handler.entered.wait, 10)
        equal = [batcher.submit(c, key=c) for c in range(8)]
        handler.gate.set()
        await asyncio.gather(first, *equal)
        assert handler.batches[1:] == [list(range(8))]


async def test_without_a_latency_target_a_caller_alone_gets_long_batches():
    handler = Timed(5)
    async with running(handler, max_batch=32, max_batch_ms=0) as batcher:
        await batcher.submit(-1)
        handler.gate.clear()
        handler.entered.clear()
        first = batcher.submit(-2)
        assert await asyncio.to_thread(handler.entered.wait, 10)
        rest = [batcher.submit(i) for i in range(20)]
        handler.gate.set()
        await asyncio.gather(first, *rest)
        assert handler.batches[2:] == [list(range(20))]
