"""A real server on 127.0.0.1, real WebSocket clients, real audio."""

import asyncio
import json
import logging
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import websockets
from helpers import ask, b64, chirp, connect, cosine, held_model, noise, running_server, threaded, tone, until, url

from clap_ws.errors import ErrorCode
from clap_ws.extractor import CLAPExtractor
from clap_ws.model.checkpoint import Identity
from clap_ws.server import ClapServer, ServerConfig


@pytest.fixture(scope="module")
def extractor(model):
    return CLAPExtractor(model=model)


async def test_binary_round_trip_legacy_shape(server, extractor):
    x = tone(440, seconds=2)
    async with connect(server, query="ckpt_dir=/tmp/ckpt&sample_rate=48000&mfcc_focus=1") as ws:
        reply = await ask(ws, x.tobytes())
    assert reply["status"] == "OK" and reply["type"] == "clap" and reply["model"] == "untrained"
    assert reply["embedding"] == reply["features"] and len(reply["features"]) == 512
    assert np.linalg.norm(reply["embedding"]) == pytest.approx(1.0, abs=1e-5)
    for key in ("time", "extraction_time_ms", "queue_ms", "model_ms"):
        assert reply[key] >= 0
    assert reply["extraction_time_ms"] >= reply["model_ms"]
    # the Python API runs the same pipeline on the same model
    np.testing.assert_allclose(reply["embedding"], extractor.extract_embedding(x), atol=2e-6)


async def test_json_base64_equals_binary_and_echoes_id(server):
    x = chirp(seconds=1.5)
    async with connect(server) as ws:
        by_binary = await ask(ws, x.tobytes())
        by_json = await ask(ws, {"audio_buffer": b64(x), "sample_rate": 48000, "id": "sound-1"})
    assert by_json["id"] == "sound-1" and by_binary["id"] is None
    np.testing.assert_allclose(by_json["embedding"], by_binary["embedding"], atol=1e-6)


async def test_query_sample_rate_is_used_for_binary_frames(server):
    x44 = tone(660, sr=44100, seconds=2)
    async with connect(server, query="sample_rate=44100&ckpt_dir=x") as ws:
        from_query = await ask(ws, x44.tobytes())
    async with connect(server) as ws:
        from_json = await ask(ws, {"audio_buffer": b64(x44), "sample_rate": 44100})
        as_if_48k = await ask(ws, x44.tobytes())  # same bytes read at the 48 kHz default
    np.testing.assert_allclose(from_query["embedding"], from_json["embedding"], atol=1e-6)
    assert cosine(from_query["embedding"], as_if_48k["embedding"]) < 0.99999


async def test_embed_batch_matches_single_requests(server):
    clips = [tone(220, seconds=1), noise(seconds=3, seed=2), chirp(seconds=12)]
    async with connect(server) as ws:
        singles = [await ask(ws, {"audio_buffer": b64(c), "sample_rate": 48000}) for c in clips]
        batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(c) for c in clips],
                               "sample_rate": 48000, "id": 11})
    assert batch["status"] == "OK" and batch["count"] == 3 and batch["id"] == 11
    for single, emb in zip(singles, batch["embeddings"]):
        np.testing.assert_allclose(single["embedding"], emb, atol=1e-5)


async def test_pipelined_binary_frames_come_back_in_order(server):
    clips = [tone(100 + 150 * i, seconds=0.5) for i in range(12)]
    async with connect(server) as ws:
        expected = [(await ask(ws, c.tobytes()))["embedding"] for c in clips]
        for c in clips:  # all sent before any reply is read
            await ws.send(c.tobytes())
        got = [json.loads(await ws.recv())["embedding"] for _ in clips]
    for e, g in zip(expected, got):
        np.testing.assert_allclose(e, g, atol=1e-6)
    assert min(cosine(a, b) for a, b in zip(got, got[1:])) < 0.9999  # they really differ


async def test_ids_on_pipelined_json_and_mixed_frames(server):
    async with connect(server) as ws:
        for i in range(10):
            await ws.send(json.dumps({"audio_buffer": b64(noise(seconds=0.3, seed=i)), "id": f"r{i}"}))
        await ws.send(json.dumps({"op": "info", "id": "info"}))
        await ws.send("not json")
        replies = [json.loads(await ws.recv()) for _ in range(12)]
    assert [r["id"] for r in replies] == [f"r{i}" for i in range(10)] + ["info", None]
    assert replies[-1]["error"]["code"] == ErrorCode.BAD_JSON


async def test_binary_reply_format(server):
    x = noise(seconds=1, seed=5)
    async with connect(server, query="reply=binary") as ws:
        await ws.send(x.tobytes())
        raw = await ws.recv()
        reference = await ask(ws, {"audio_buffer": b64(x), "reply": "json"})
        await ws.send(json.dumps({"op": "embed_batch", "audio_buffers": [b64(x)] * 3}))
        raw_batch = await ws.recv()
    assert isinstance(raw, bytes) and len(raw) == 2048
    np.testing.assert_allclose(np.frombuffer(raw, "<f4"), reference["embedding"], atol=1e-6)
    assert np.frombuffer(raw_batch, "<f4").reshape(3, 512).shape == (3, 512)


async def test_multichannel_and_peak_normalize(server):
    left, right = tone(440, seconds=1, amp=0.1), tone(880, seconds=1, amp=0.1)
    stereo = np.stack([left, right], 1).reshape(-1)
    async with connect(server, query="channels=2") as ws:
        from_stereo = await ask(ws, stereo.tobytes())
    async with connect(server) as ws:
        from_mono = await ask(ws, ((left + right) / 2).tobytes())
        quiet = await ask(ws, {"audio_buffer": b64(left), "id": 1})
        loud = await ask(ws, {"audio_buffer": b64(left * 10), "id": 2})
        normalized = await ask(ws, {"audio_buffer": b64(left), "normalize": "peak"})
    np.testing.assert_allclose(from_stereo["embedding"], from_mono["embedding"], atol=1e-5)
    assert cosine(quiet["embedding"], loud["embedding"]) < 0.99999  # no silent normalisation
    assert cosine(normalized["embedding"], loud["embedding"]) > cosine(normalized["embedding"], quiet["embedding"])


async def test_long_clip_is_deterministic_and_mode_dependent(server):
    x = np.concatenate([chirp(seconds=10), noise(seconds=10, seed=3), tone(300, seconds=5)])
    async with connect(server) as ws:
        first = await ask(ws, x.tobytes())
        again = await ask(ws, x.tobytes())
        head = await ask(ws, {"audio_buffer": b64(x), "long_clip": "head"})
        center = await ask(ws, {"audio_buffer": b64(x), "long_clip": "center"})
        only_head = await ask(ws, x[:480000].tobytes())
    assert first["embedding"] == again["embedding"]
    np.testing.assert_allclose(head["embedding"], only_head["embedding"], atol=1e-6)
    assert cosine(first["embedding"], head["embedding"]) < 0.9999
    assert cosine(center["embedding"], head["embedding"]) < 0.9999


async def test_every_bad_input_gets_an_error_and_the_connection_survives(server):
    good = tone(seconds=0.5)
    bad_messages = [
        (b"", "bad_audio"),
        (b"\x00" * 5, "bad_audio"),
        (np.array([0, np.nan, 0, 0], np.float32).tobytes(), "bad_audio"),
        (np.array([np.inf] * 4, np.float32).tobytes(), "bad_audio"),
        (noise(seconds=61).tobytes(), "too_long"),
        ("{not json", "bad_json"),
        ("[]", "bad_json"),
        (json.dumps({"op": "explode"}), "unknown_op"),
        (json.dumps({"audio_buffer": "***", "sample_rate": 48000}), "bad_base64"),
        (json.dumps({"audio_buffer": b64(good), "sample_rate": 4000}), "bad_sample_rate"),
        (json.dumps({"audio_buffer": b64(good), "sample_rate": 400000}), "bad_sample_rate"),
        (json.dumps({"audio_buffer": b64(good), "sample_rate": "fast"}), "bad_request"),
        (json.dumps({"audio_buffer": b64(good), "unknown_field": 1}), "bad_request"),
        (json.dumps({"audio_buffer": b64(good), "channels": 2.5}), "bad_request"),
        (json.dumps({"audio_buffer": b64(np.zeros(3, np.float32)), "channels": 2}), "bad_audio"),
        (json.dumps({"op": "embed_batch", "audio_buffers": "abc"}), "bad_request"),
        (json.dumps({"op": "embed_batch", "audio_buffers": [b64(good), ""]}), "bad_audio"),
    ]
    async with connect(server) as ws:
        for message, code in bad_messages:
            reply = await ask(ws, message)
            assert reply["status"] == "ERROR", message[:80]
            assert reply["error"]["code"] == code, (message[:80], reply)
            assert reply["error"]["message"]
            assert set(reply) == {"status", "error", "id"}
        ok = await ask(ws, good.tobytes())
    assert ok["status"] == "OK"


async def test_bad_query_errors_each_binary_frame_but_json_still_works(server):
    async with connect(server, query="sample_rate=abc") as ws:
        bad = await ask(ws, tone(seconds=0.2).tobytes())
        good = await ask(ws, {"audio_buffer": b64(tone(seconds=0.2)), "sample_rate": 48000})
    assert bad["error"]["code"] == ErrorCode.BAD_REQUEST and "sample_rate" in bad["error"]["message"]
    assert good["status"] == "OK"


async def test_paths(server):
    for path in ("/", "/clap"):
        async with connect(server, path=path) as ws:
            assert (await ask(ws, tone(seconds=0.2).tobytes()))["status"] == "OK"
    async with connect(server, path="/elsewhere") as ws:
        reply = json.loads(await ws.recv())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
    assert reply["error"]["code"] == ErrorCode.NOT_FOUND and "/clap" in reply["error"]["message"]
    assert ws.close_code == 4404


async def test_one_shot_and_probe_connections(server):
    for i in range(5):  # the legacy pattern: a fresh socket per sound
        await (await websockets.connect(url(server, query="sample_rate=48000"))).close()  # a probe
        async with websockets.connect(url(server, query="sample_rate=48000")) as ws:
            await ws.send(noise(seconds=0.5, seed=i).tobytes())
            assert json.loads(await ws.recv())["status"] == "OK"
    async with connect(server) as ws:
        assert (await ask(ws, {"op": "info"}))["connections"] == 1


async def test_frames_over_one_mib(server):
    x = noise(seconds=30)  # 5.8 MB: the old service's 1 MiB limit would close the socket
    async with connect(server) as ws:
        reply = await ask(ws, x.tobytes())
    assert reply["status"] == "OK"


async def test_info_describes_model_and_counters(server):
    async with connect(server) as ws:
        await ask(ws, tone(seconds=0.2).tobytes())
        info = await ask(ws, {"op": "info", "id": "i"})
    assert info["status"] == "OK" and info["id"] == "i"
    assert info["model"] == "untrained" and info["untrained"] is True and info["checkpoint_sha256"] is None
    assert info["architecture"] == "HTSAT-tiny" and info["device"] == "cpu"
    assert info["precision"] in ("bf16", "fp32") and info["dimension"] == 512 and info["sample_rate"] == 48000
    assert info["batches"] >= 1 and info["items"] >= 1 and info["queue_depth"] == 0


async def test_sixteen_clients_share_few_model_calls(model):
    async with running_server(model, max_wait_ms=20) as server:
        async def one(i):
            async with connect(server) as ws:
                return await ask(ws, noise(seconds=1, seed=i).tobytes())

        replies = await asyncio.gather(*(one(i) for i in range(16)))
        assert all(r["status"] == "OK" for r in replies)
        assert server.batcher.items == 16
        assert server.batcher.batches <= 4, server.batcher.batches


async def test_busy_when_queue_is_full(model):
    async with running_server(model, max_queue=2, max_wait_ms=0) as server:
        async with connect(server) as ws:
            for i in range(12):
                await ws.send(json.dumps({"audio_buffer": b64(noise(seconds=0.5, seed=i)), "id": i}))
            replies = [json.loads(await ws.recv()) for _ in range(12)]
        assert [r["id"] for r in replies] == list(range(12))  # every request answered, in order
        busy = [r for r in replies if r["status"] == "ERROR"]
        assert busy and all(r["error"]["code"] == ErrorCode.BUSY for r in busy)
        assert sum(r["status"] == "OK" for r in replies) >= 2
        async with connect(server) as ws:  # and the server goes on serving
            assert (await ask(ws, tone(seconds=0.2).tobytes()))["status"] == "OK"


def http_get(server, path="/health"):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_health_follows_the_worker(server):
    status, body = await asyncio.to_thread(http_get, server)
    assert status == 200 and body["status"] == "ok" and body["model"] == "untrained"
    await asyncio.to_thread(server.batcher.stop, 5)  # the worker ends
    status, body = await asyncio.to_thread(http_get, server)
    assert status == 503 and body["status"] == "worker_dead"
    for _ in range(40):  # the watchdog restarts it within ~1 s
        await asyncio.sleep(0.1)
        if server.batcher.alive:
            break
    status, _ = await asyncio.to_thread(http_get, server)
    assert status == 200
    async with connect(server) as ws:
        assert (await ask(ws, tone(seconds=0.2).tobytes()))["status"] == "OK"


async def test_client_gone_before_inference_is_dropped(model):
    """Held in its first batch, the worker leaves 5 requests queued; their client leaves; they are never run."""
    async with running_server(model, max_wait_ms=0) as server:
        with held_model(model) as (inside, release):
            async with connect(server) as ws:
                await ws.send(noise(seconds=0.5, seed=0).tobytes())
                assert await asyncio.to_thread(inside.wait, 30)  # the first request is being embedded
                for i in range(1, 6):
                    await ws.send(noise(seconds=0.5, seed=i).tobytes())
                assert await until(lambda: server.batcher.depth == 5, 2)
            # closed without reading: the queued requests are cancelled, not run
            assert await until(lambda: server.info()["connections"] == 0)
            release.set()
            assert await until(lambda: server.batcher.depth == 0
                               and server.batcher.items + server.batcher.dropped == 6, 5)
            assert (server.batcher.items, server.batcher.dropped) == (1, 5)
        async with connect(server) as ws:
            assert (await ask(ws, tone(seconds=0.2).tobytes()))["status"] == "OK"


async def test_shutdown_finishes_in_flight_requests(model):
    server = await ClapServer(model, ServerConfig(port=0)).start()
    try:
        async with connect(server) as ws:
            for i in range(4):
                await ws.send(noise(seconds=0.5, seed=i).tobytes())
            await asyncio.sleep(0.05)
            stopping = asyncio.create_task(server.shutdown())
            replies = [json.loads(await ws.recv()) for _ in range(4)]
            with pytest.raises(websockets.ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 1001
        await stopping
        assert all(r["status"] == "OK" for r in replies)
        with pytest.raises((OSError, websockets.InvalidStatus)):  # refused, or HTTP 503
            await websockets.connect(url(server), open_timeout=2)
    finally:
        await server.shutdown()


async def test_keepalive_pings_do_not_drop_a_client_waiting_on_long_batches(model):
    # pings every 0.1 s, 0.3 s to answer: the queued work below takes several seconds
    async with running_server(model, ping_interval=0.1, ping_timeout=0.3) as server:
        async with connect(server, ping_interval=None) as ws:
            for i in range(3):
                await ws.send(noise(seconds=60, seed=i).tobytes())  # 6 windows each
            replies = [json.loads(await ws.recv()) for _ in range(3)]
    assert [r["status"] for r in replies] == ["OK"] * 3


async def test_64_mib_frames_are_read_and_bigger_ones_close_with_1009(model):
    async with running_server(model, max_frame_mb=64) as server:
        async with connect(server) as ws:
            reply = await ask(ws, np.zeros(16 * 1024 * 1024, np.float32).tobytes())  # 64 MiB
            assert reply["error"]["code"] == ErrorCode.TOO_LONG  # read whole, answered, still open
            assert (await ask(ws, tone(seconds=0.2).tobytes()))["status"] == "OK"
        ws = await connect(server)
        await ws.send(np.zeros(16 * 1024 * 1024 + 1, np.float32).tobytes())
        with pytest.raises(websockets.ConnectionClosed):
            await ws.recv()
        assert ws.close_code == 1009


async def test_connections_past_the_limit_close_with_1013(model):
    async with running_server(model, max_connections=2) as server:
        async with connect(server) as a, connect(server) as b:
            async with connect(server) as c:
                with pytest.raises(websockets.ConnectionClosed):
                    await c.recv()
            assert c.close_code == 1013
            assert (await ask(a, tone(seconds=0.2).tobytes()))["status"] == "OK"
            assert (await ask(b, tone(seconds=0.2).tobytes()))["status"] == "OK"


async def test_careless_clients_are_told_what_went_wrong(server):
    """int16 bytes, unscaled samples and misspelt URL keys: served or refused, never silently misread."""
    pcm16 = (tone(seconds=0.5) * 32767).astype("<i2").tobytes()
    nan_bytes = np.array([0x7FC0_0000] * 4000, "<u4").tobytes()  # what int16 often turns into: NaN floats
    async with connect(server, query="samplerate=44100&sample_rate=48000&foo=1") as ws:
        plain = await ask(ws, tone(seconds=0.5).tobytes())
        loud = await ask(ws, (tone(seconds=0.5) * 3).tobytes())
        integers = await ask(ws, (tone(seconds=0.5) * 32767).tobytes())
        nan = await ask(ws, nan_bytes)
        as_json = await ask(ws, {"audio_buffer": b64(tone(seconds=0.5))})
        batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(tone(seconds=0.5)),
                                                                      b64(tone(seconds=0.5) * 3)]})
        peak = await ask(ws, {"audio_buffer": b64(tone(seconds=0.5) * 3), "normalize": "peak"})
    unknown = [w for w in plain["warnings"] if "unknown URL query key" in w]
    assert [w.split("'")[1] for w in unknown] == ["foo", "samplerate"] and plain["status"] == "OK"
    assert any("beyond [-1, 1]" in w and "normalize=peak" in w for w in loud["warnings"])
    assert any("integer PCM" in w and "32768" in w for w in integers["warnings"])
    assert nan["error"]["code"] == ErrorCode.BAD_AUDIO and "float32" in nan["error"]["message"]
    assert "warnings" not in as_json  # JSON messages carry their own options: the URL's keys do not apply
    assert batch["warnings"][0] == [] and "clipped" in batch["warnings"][1][0]
    assert "warnings" not in peak
    assert len(pcm16) % 4 == 0  # int16 PCM of even length decodes as float32: it is caught by its values


async def test_a_queued_frame_is_not_kept_once_its_windows_are_made(model):
    """Memory bounded in bytes: a request waiting for the model holds its 10-s windows, not its frame."""
    import gc
    import weakref

    from clap_ws.protocol import ConnectionDefaults, parse_binary
    from clap_ws.service import Service

    class Frame(bytearray):  # bytes that a weak reference can watch
        pass

    service = Service(model, warm_up=False)
    try:
        service.batcher.stop(5)  # nothing is taken off the queue: the request waits there
        service.batcher._stopping = False
        frame = Frame(tone(seconds=3).tobytes())
        watch = weakref.ref(frame)
        reply = await service.dispatch(parse_binary(frame, ConnectionDefaults()), 0.0, client="c")
        del frame
        gc.collect()
        assert watch() is None and service.batcher.load == 1  # queued: one window, no frame
        reply.cancel()
    finally:
        service.close()


async def test_admission_counts_windows_not_requests(model):
    """Two 60-s clips are 12 windows of model time: more than --max-queue 8 can ever hold."""
    minute, other = b64(noise(seconds=60, seed=3)), b64(noise(seconds=60, seed=4))
    async with running_server(model, max_queue=8) as server:
        async with connect(server) as ws:
            too_big = await ask(ws, {"op": "embed_batch", "audio_buffers": [minute, other], "id": 1})
            fits = await ask(ws, {"op": "embed_batch", "audio_buffers": [minute], "long_clip": "head", "id": 2})
    assert too_big["error"]["code"] == ErrorCode.TOO_MANY_ITEMS and "12 units" in too_big["error"]["message"]
    assert fits["status"] == "OK" and server.batcher.load == 0


def test_failed_accepts_are_logged_once_per_interval(model, caplog):
    """Out of descriptors, asyncio retries every accept: 38,798 log lines in one probe; now one per 10 s."""
    from websockets.sync.client import connect as sync_connect

    async def out_of_descriptors():  # what asyncio's accept loop reports, on the server's own loop
        loop = asyncio.get_running_loop()
        for _ in range(500):
            loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                         "exception": OSError(24, "Too many open files")})
        loop.call_exception_handler({"message": "something else entirely"})

    with threaded(model) as srv:
        with caplog.at_level(logging.ERROR):
            srv.call(out_of_descriptors)
        assert srv.server.accept_failures == 500
        accepts = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
        assert len(accepts) == 1 and "Too many open files" in accepts[0].getMessage()
        assert any("something else entirely" in r.getMessage() for r in caplog.records)  # others pass through
        with sync_connect(srv.url) as ws:
            ws.send(json.dumps({"op": "info"}))
            assert json.loads(ws.recv(timeout=60))["status"] == "OK"


async def test_the_handshake_names_the_model_for_clients_of_bare_binary_replies(model):
    """``X-Clap-Model`` on the accepted handshake, percent-encoded (a folder name may be any text); binary replies
    carry no ``model`` field, so this is how their client knows what made them."""
    named = model.variant(identity=Identity("Mödel 2/clap ü.pt", sha256="0" * 64))
    async with running_server(named) as server:
        async with connect(server, query="reply=binary") as ws:
            header = ws.response.headers["X-Clap-Model"]
            await ws.send(tone(seconds=0.2).tobytes())
            assert len(await asyncio.wait_for(ws.recv(), 60)) == 512 * 4  # a bare float32 reply
    assert header.isascii() and urllib.parse.unquote(header) == "Mödel 2/clap ü.pt"
