"""The one in-flight layer for sounds and texts (clap_ws.inflight), without a server or a model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from clap_ws.errors import ClapError
from clap_ws.inflight import Computed
from clap_ws.similarity import EmbeddingCache


def rows_of(result):
    return [(vec, "extra") for vec in result]


async def test_a_key_is_computed_once_then_cached_with_its_meta():
    computed = Computed(EmbeddingCache(8), "text")
    job = asyncio.get_running_loop().create_future()
    (row,) = computed.start(job, ["a bell"], [("note",)], rows_of)
    assert computed.find("a bell") == (row, ("note",))  # a second request shares the row in flight
    first, second = computed.wait([row]), computed.wait([computed.find("a bell")[0], np.ones(2)])
    job.set_result([np.zeros(2)])
    (a,), (b, c) = await first, await second
    assert a[1] == b[1] == "extra" and np.array_equal(a[0], b[0]) and np.array_equal(c, np.ones(2))
    cached = computed.find("a bell")
    assert not computed.flying("a bell") and np.array_equal(cached[0], np.zeros(2)) and cached[1] == ("note",)


async def test_a_job_is_cancelled_only_when_every_claim_on_it_is_gone():
    computed = Computed(EmbeddingCache(8), "audio")
    job = asyncio.get_running_loop().create_future()
    rows = computed.start(job, ["x", "y"], [(), ()], rows_of)
    leaves, stays = computed.wait([rows[0]]), computed.wait([rows[1]])  # two requests, one row each
    await asyncio.sleep(0)
    leaves.cancel()
    await asyncio.sleep(0)
    assert not job.cancelled()  # the other request still waits for the job's other row
    stays.cancel()
    await asyncio.sleep(0)
    assert job.cancelled()  # nobody is left
    await asyncio.sleep(0)
    with pytest.raises(ClapError, match="the audio job was cancelled"):
        rows[0].result()
    assert computed.find("x") is None  # neither cached nor in flight: the next request starts anew


async def test_a_claim_counts_from_the_asking_not_the_awaiting():
    """A request that asked but has not yet begun to wait keeps the job alive when another one leaves."""
    computed = Computed(EmbeddingCache(8), "text")
    job = asyncio.get_running_loop().create_future()
    (row,) = computed.start(job, ["t"], [()], rows_of)
    early = computed.wait([row])
    late = computed.wait([row])  # asked, not awaited by anyone yet
    early.cancel()
    await asyncio.sleep(0)
    assert not job.cancelled()
    job.set_result([np.ones(3)])
    assert np.array_equal((await late)[0][0], np.ones(3))


async def test_without_sharing_nothing_is_found_or_cached_and_a_failed_job_fails_its_rows():
    computed = Computed(EmbeddingCache(0), "audio")
    job = asyncio.get_running_loop().create_future()
    (row,) = computed.start(job, [("buffer", 0)], [()], rows_of, share=False)
    assert computed.find(("buffer", 0)) is None  # a private key: another request's buffer 0 is another sound
    waiting = computed.wait([row])
    job.set_exception(ClapError("the model failed"))
    with pytest.raises(ClapError, match="the model failed"):
        await waiting
    assert len(computed.cache) == 0
