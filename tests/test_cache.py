"""A sound embedded once: the content-addressed audio cache and in-flight deduplication, over real servers."""

from __future__ import annotations

import asyncio
import json

import numpy as np
from helpers import ask, b64, connect, held_model, noise, running_server, tone, until


async def info(ws) -> dict:
    return await ask(ws, {"op": "info"})


async def test_a_repeated_sound_is_answered_from_the_cache_bit_for_bit(model):
    sound = noise(seconds=1.5, seed=11)
    async with running_server(model) as server:
        async with connect(server, query="sample_rate=48000") as ws:
            first = await ask(ws, sound.tobytes())
            windows = (await info(ws))["audio_windows"]
            again = await ask(ws, sound.tobytes())
            by_json = await ask(ws, {"audio_buffer": b64(sound), "sample_rate": 48000})
            stats = await info(ws)
        async with connect(server, query="reply=binary") as ws:
            await ws.send(sound.tobytes())
            binary = np.frombuffer(await ws.recv(), "<f4")
    assert first["cached"] is False and again["cached"] is True and by_json["cached"] is True
    assert again["embedding"] == first["embedding"] and by_json["embedding"] == first["embedding"]  # bit for bit
    np.testing.assert_array_equal(binary, np.array(first["embedding"], np.float32))
    assert stats["audio_windows"] == windows  # no model call for either repeat
    assert again["model"] == "untrained" and again["model_ms"] == 0  # an untrained cache hit still says so
    assert stats["audio_cache"]["hits"] == 2 and stats["audio_cache"]["misses"] == 1


async def test_a_different_rate_channel_count_or_option_is_a_miss(model):
    sound = tone(330, seconds=1)
    base = {"audio_buffer": b64(sound), "sample_rate": 48000}
    variants = [{"sample_rate": 44100}, {"channels": 2}, {"normalize": "peak"}, {"long_clip": "head"}]
    async with running_server(model) as server:
        async with connect(server) as ws:
            assert (await ask(ws, base))["cached"] is False
            replies = [await ask(ws, {**base, **change}) for change in variants]
            repeat = await ask(ws, base)
    assert [r["cached"] for r in replies] == [False] * 4 and repeat["cached"] is True


async def test_eviction_at_the_bound(model):
    a, b, c = (b64(noise(seconds=0.5, seed=s)) for s in (1, 2, 3))
    async with running_server(model, audio_cache=2) as server:
        async with connect(server) as ws:
            for sound in (a, b, c):  # a is evicted by c
                await ask(ws, {"audio_buffer": sound})
            assert (await ask(ws, {"audio_buffer": c}))["cached"] is True
            assert (await ask(ws, {"audio_buffer": a}))["cached"] is False
            stats = (await info(ws))["audio_cache"]
    assert stats["size"] == 2 and stats["evictions"] == 2 and stats["capacity"] == 2


async def test_duplicates_in_one_batch_and_in_flight_at_once_are_embedded_once(model):
    sound = b64(noise(seconds=2, seed=5))
    async with running_server(model) as server:
        async with connect(server) as ws, connect(server) as other:
            before = (await info(ws))["audio_windows"]
            batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [sound, sound, sound]})
            assert (await info(ws))["audio_windows"] == before + 1
            assert batch["cached"] == [False, False, False] and batch["embeddings"][0] == batch["embeddings"][2]
            fresh = b64(noise(seconds=2, seed=6))
            before = (await info(ws))["audio_windows"]
            await ws.send(json.dumps({"audio_buffer": fresh}))
            await other.send(json.dumps({"audio_buffer": fresh}))
            one, two = json.loads(await ws.recv()), json.loads(await other.recv())
            assert (await info(ws))["audio_windows"] == before + 1
    assert one["embedding"] == two["embedding"]


async def test_silence_of_any_length_is_one_model_input(model):
    async with running_server(model) as server:
        async with connect(server) as ws:
            short = await ask(ws, {"audio_buffer": b64(np.zeros(16000, np.float32)), "sample_rate": 16000})
            long = await ask(ws, {"audio_buffer": b64(np.zeros(48000 * 3, np.float32))})
            below_int16 = await ask(ws, {"audio_buffer": b64(np.full(4800, 1e-6, np.float32))})  # quantises to 0
    assert short["cached"] is False and long["cached"] is True and below_int16["cached"] is True
    assert long["embedding"] == short["embedding"]


async def test_no_cache_means_no_cached_field_and_every_sound_runs(model):
    sound = b64(noise(seconds=0.5, seed=9))
    async with running_server(model, audio_cache=0) as server:
        async with connect(server) as ws:
            first = await ask(ws, {"audio_buffer": sound})
            before = (await info(ws))["audio_windows"]
            second = await ask(ws, {"audio_buffer": sound})
            assert (await info(ws))["audio_windows"] == before + 1
    assert "cached" not in first and "cached" not in second


async def test_a_client_that_leaves_cancels_only_work_nobody_else_waits_for(model):
    """Behind a batch in progress, a leaving client has two sounds queued: one another client also waits for (it
    runs), one nobody else wants (its job is cancelled and dropped before the model sees it)."""
    shared, mine = b64(noise(seconds=2, seed=21)), b64(noise(seconds=2, seed=22))
    async with running_server(model) as server:
        with held_model(model) as (inside, release):
            async with connect(server) as stays, connect(server) as busy:
                await busy.send(noise(seconds=1, seed=30).tobytes())
                assert await asyncio.to_thread(inside.wait, 30)  # the model is busy with it
                dropped = server.batcher.dropped
                async with connect(server) as leaves:
                    await leaves.send(json.dumps({"audio_buffer": shared}))
                    await leaves.send(json.dumps({"audio_buffer": mine}))
                    assert await until(lambda: server.batcher.depth == 2)
                    await stays.send(json.dumps({"audio_buffer": shared}))  # joins the leaver's job in flight
                    await asyncio.sleep(0.1)
                    assert server.batcher.depth == 2
                assert await until(lambda: server.batcher.dropped == dropped + 1)  # gone before its batch
                release.set()
                reply = json.loads(await asyncio.wait_for(stays.recv(), 60))
                assert json.loads(await asyncio.wait_for(busy.recv(), 60))["status"] == "OK"
                assert server.batcher.dropped == dropped + 1  # the sound only the leaver wanted never ran
                again = await ask(stays, {"audio_buffer": mine})
    assert reply["status"] == "OK" and len(reply["embedding"]) == 512 and reply["cached"] is False
    assert again["cached"] is False  # it was never embedded, so it is not in the cache either
