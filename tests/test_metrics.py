"""GET /metrics: exact counts after a known workload, parsed by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from helpers import ask, b64, connect, noise, running_server
from prometheus_client.parser import text_string_to_metric_families


def scrape(port: int, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers),
                                    timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} for the whole exposition (the parser raises on anything malformed)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_counts_after_a_known_workload_are_exact(model):
    a, b = noise(seconds=1, seed=1), noise(seconds=1, seed=2)
    async with running_server(model) as server, running_server(model) as other:
        async with connect(server) as ws:
            for sound in (a, b, a):  # the repeat comes from the audio cache
                assert (await ask(ws, sound.tobytes()))["status"] == "OK"
            await ask(ws, {"op": "embed_text", "texts": ["a bell", "a drum"]})
            await ask(ws, {"op": "embed_text", "texts": ["a bell"]})  # cached prompt
            assert (await ask(ws, "not json"))["error"]["code"] == "bad_json"
            await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(a)], "sample_rate": 1000})  # bad_sample_rate
            await ask(ws, {"op": "info"})
            status, text = await asyncio.to_thread(scrape, server.port)
        _, quiet = await asyncio.to_thread(scrape, other.port)
    assert status == 200
    found = samples(text)
    assert value(found, "clap_ws_requests_total", op="embed", outcome="ok") == 3
    assert value(found, "clap_ws_requests_total", op="embed_text", outcome="ok") == 2
    assert value(found, "clap_ws_requests_total", op="invalid", outcome="bad_json") == 1
    assert value(found, "clap_ws_requests_total", op="invalid", outcome="bad_sample_rate") == 1  # did not validate
    assert value(found, "clap_ws_requests_total", op="info", outcome="ok") == 1
    assert value(found, "clap_ws_request_seconds_count", op="embed") == 3
    assert value(found, "clap_ws_items_total", kind="audio") == 3
    assert value(found, "clap_ws_items_total", kind="text") == 3
    assert value(found, "clap_ws_audio_cache_total", result="hit") == 1
    assert value(found, "clap_ws_audio_cache_total", result="miss") == 2
    assert value(found, "clap_ws_text_cache_total", result="hit") == 1
    assert value(found, "clap_ws_text_cache_total", result="miss") == 2
    assert value(found, "clap_ws_model_windows_total") == 2  # two sounds (the warm-up runs outside the counts)
    assert value(found, "clap_ws_clip_seconds_count") == 2 and value(found, "clap_ws_clip_seconds_sum") == 2.0
    assert value(found, "clap_ws_connections") == 1 and value(found, "clap_ws_worker_alive") == 1
    assert value(found, "clap_ws_queue_depth") == 0
    assert value(found, "clap_ws_queue_wait_seconds_count") == value(found, "clap_ws_batch_size_sum")
    build = next(labels for (name, labels), _ in found.items() if name == "clap_ws_build_info")
    assert dict(build)["model"] == "untrained" and dict(build)["device"] == "cpu"
    assert value(samples(quiet), "clap_ws_requests_total", op="embed", outcome="ok") == 0  # its own registry


async def test_rejections_and_the_token_option(model, tmp_path):
    async with running_server(model, token="s3cret", max_connections=1) as server:
        status, _ = await asyncio.to_thread(scrape, server.port)
        assert status == 200  # open by default, like /health
        try:
            async with connect(server):
                raise AssertionError("connected without the token")
        except Exception as exc:
            assert "401" in str(exc)
        async with connect(server, query="token=s3cret") as ws:
            await ask(ws, {"op": "info"})
            async with connect(server, query="token=s3cret") as extra:  # past --max-connections: closed, 1013
                await extra.wait_closed()
        _, text = await asyncio.to_thread(scrape, server.port)
    found = samples(text)
    assert value(found, "clap_ws_rejected_total", reason="unauthorized") == 1
    assert value(found, "clap_ws_rejected_total", reason="too_many_connections") == 1
    async with running_server(model, token="s3cret", metrics_token=True) as guarded:
        assert (await asyncio.to_thread(scrape, guarded.port))[0] == 401
        status, text = await asyncio.to_thread(scrape, guarded.port, "s3cret")
    assert status == 200 and "clap_ws_build_info" in text


async def test_busy_is_counted_as_a_rejection(model):
    minute = [b64(noise(seconds=60, seed=s)) for s in range(5)]  # 6 windows each
    async with running_server(model, max_queue=6, max_batch=1) as server:
        async with connect(server) as ws:
            for sound in minute:
                await ws.send(json.dumps({"op": "embed_batch", "audio_buffers": [sound]}))
            replies = [json.loads(await ws.recv()) for _ in minute]
        _, text = await asyncio.to_thread(scrape, server.port)
    busy = sum(r.get("error", {}).get("code") == "busy" for r in replies)
    assert busy >= 1 and value(samples(text), "clap_ws_rejected_total", reason="busy") == busy
