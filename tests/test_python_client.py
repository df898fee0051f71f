"""The Python client (clients/python, clap_ws_client) against real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, ThreadedServer, chirp, noise, threaded, tone

sys.path.insert(0, str(ROOT / "clients" / "python"))

from clap_ws_client import AsyncClapClient, ClapClient, ClapError, ConnectionError, TimeoutError  # noqa: E402

from clap_ws.search.archive import Archives  # noqa: E402
from clap_ws.search.library import Library  # noqa: E402


@pytest.fixture(scope="module")
def srv(model, library_file, tmp_path_factory):
    with threaded(model, libraries=[Library.load(library_file)],
                  archives=Archives(tmp_path_factory.mktemp("archives"))) as server:
        yield server


async def test_every_call_against_a_real_server(srv):
    rng = np.random.default_rng(0)
    async with AsyncClapClient(srv.url) as client:
        one = await client.embed(tone(440, seconds=1))  # a binary frame, a binary reply
        assert one.embedding.shape == (512,) and one.embedding.dtype == np.float32
        assert one.model == client.model == "untrained"  # named by the handshake: the bare reply has no field
        assert abs(np.linalg.norm(one.embedding) - 1) < 1e-4
        stereo = np.stack([tone(440, sr=44100, seconds=1), chirp(sr=44100, seconds=1)], axis=1).astype(np.float64)
        scored = await client.embed(stereo, 44100, prompts=["a bell", "a hiss"], probs=True, top_k=2)
        assert scored.model == "untrained" and set(scored.similarity) == {"a bell", "a hiss"}
        assert abs(sum(scored.probs.values()) - 1) < 1e-6 and len(scored.matches) == 2
        assert scored.cached is False and scored.timing["model_ms"] > 0
        same = await client.embed(stereo, 44100)  # JSON request (stereo, 44.1 kHz), binary reply, from the cache
        np.testing.assert_array_equal(same.embedding, scored.embedding)
        assert same.model == "untrained"
        batch = await client.embed_batch([tone(220), noise(seconds=0.5)])
        assert batch.shape == (2, 512) and batch.dtype == np.float32
        items = await client.embed_batch_items([tone(220), noise(seconds=0.5)], prompts=["x"])
        np.testing.assert_array_equal(items[0].embedding, batch[0])
        assert items[1].similarity is not None and "x" in items[1].similarity
        texts = await client.embed_text(["a dog", "rain"])
        assert texts.shape == (2, 512)
        assert set(await client.similarity(tone(), ["a dog", "rain"])) == {"a dog", "rain"}
        libraries = await client.libraries()
        assert libraries[0]["name"] == "sounds" and libraries[0]["count"] == 9
        by_text = await client.search("a soft pad", top_k=3)
        assert len(by_text) == 3 and {"path", "score", "id"} <= set(by_text[0])
        by_item = await client.search(item=("sounds", by_text[0]["id"]), top_k=2, page=True)
        assert len(by_item["matches"]) == 2 and by_text[0]["id"] not in [m["id"] for m in by_item["matches"]]
        assert len(await client.search(embedding=batch[0], tags=["pads"], top_k=2)) == 2
        assert len(await client.search(audio=noise(seconds=0.5), top_k=1)) == 1
        vectors = rng.standard_normal((20, 512))
        assert await client.archive_add("run", vectors, ids=[f"g{i}" for i in range(20)]) == {"added": 20,
                                                                                               "count": 20}
        assert (await client.archive_add("run", [tone(330)], audio=True))["count"] == 21
        novelty = await client.novelty("run", vectors[:3], k=5)
        assert novelty.shape == (3,) and np.all(novelty >= 0)
        nearest = await client.archive_search("run", vectors[:1], top_k=3)
        assert nearest[0][0]["id"] == "g0" and abs(nearest[0][0]["score"] - 1) < 1e-5
        assert (await client.archive_info("run"))["count"] == 21
        fit = await client.fit_projection("run", method="pca", dims=2)
        assert fit["started"] and fit["next_version"] == fit["version"] + 1 and fit["items"] == 21
        for _ in range(100):
            info = await client.projection_info()
            if info.get("installed"):
                break
            await asyncio.sleep(0.1)
        assert info["installed"]["dimensions"] == 2
        assert await client.archive_drop("run") is True
        assert (await client.info())["model"] == "untrained"


def test_the_blocking_client_does_the_same(srv):
    with ClapClient(srv.url, reply="json") as client:
        result = client.embed(noise(seconds=0.5, seed=3), 48000)
        assert result.embedding.shape == (512,) and result.model == "untrained"  # JSON replies name the model
        assert client.embed_text("a bell").shape == (1, 512)
        assert client.info()["model"] == "untrained"


async def test_bad_input_fails_before_sending_and_server_errors_carry_their_code(srv):
    async with AsyncClapClient(srv.url) as client:
        items = (await client.info())["items"]
        for bad, words in ((np.zeros(0, np.float32), "empty"), (np.full(10, np.nan), "NaN"),
                           (np.zeros((2, 2, 2)), "shape"), (np.array(["a"]), "float"), (np.arange(9), "float")):
            with pytest.raises(ValueError, match=words):
                await client.embed(bad)
        with pytest.raises(ValueError, match="512"):
            await client.novelty("run", np.ones((2, 3)))
        with pytest.raises(TypeError, match="unknown option"):
            await client.embed(tone(), colour="red")
        assert (await client.info())["items"] == items  # nothing reached the server
        for call, code in ((client.search("x", library="nope"), "unknown_library"),
                           (client.novelty("no-such-archive", np.ones((1, 512))), "unknown_archive"),
                           (client.embed(noise(seconds=1), 5), "bad_sample_rate"),
                           (client.request({"op": "nope"}), "unknown_op")):
            with pytest.raises(ClapError) as error:
                await call
            assert error.value.code == code and error.value.request_id
        assert len(await client.embed_text(["still fine"])) == 1  # the connection goes on


async def test_a_timeout_leaves_the_connection_usable(srv):
    async with AsyncClapClient(srv.url, timeout=60) as client:
        slow = [noise(seconds=30, seed=40 + i) for i in range(3)]  # nine windows: far more than 1 ms
        with pytest.raises(TimeoutError) as error:
            await client.embed_batch(slow, timeout=0.001)
        assert isinstance(error.value, ClapError) and error.value.code == "timeout"
        fresh = await client.embed(tone(500))  # answered after the late reply, which is dropped
        assert fresh.embedding.shape == (512,)
        assert client.pending == 0


async def test_100_pipelined_calls_each_get_their_own_reply(srv):
    sounds = [noise(seconds=0.3, seed=100 + i) for i in range(5)]
    async with AsyncClapClient(srv.url, max_in_flight=32) as client:
        reference = [(await client.embed(s)).embedding for s in sounds]  # cached from now on
        started = time.monotonic()
        results = await asyncio.gather(*(client.embed(sounds[i % 5]) for i in range(100)))
        for i, result in enumerate(results):
            np.testing.assert_array_equal(result.embedding, reference[i % 5])
        texts = await asyncio.gather(*(client.embed_text([f"prompt {i}"]) for i in range(20)))
        assert len({t.tobytes() for t in texts}) == 20  # twenty different prompts, twenty different rows
        assert time.monotonic() - started < 120


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_server_restarted_mid_run_is_reconnected_to(model):
    port = free_port()
    first = await asyncio.to_thread(ThreadedServer, model, port=port)
    client = AsyncClapClient(f"ws://127.0.0.1:{port}/clap", timeout=60, retries=3)
    try:
        assert (await client.embed(tone(300))).embedding.shape == (512,)
        await asyncio.to_thread(first.stop)
        with pytest.raises(ConnectionError) as error:  # not safe to repeat: it may have been applied
            await client.archive_add("a", np.ones((1, 512)), timeout=2)
        assert error.value.code in ("connection_lost", "connect_failed")
        second = await asyncio.to_thread(ThreadedServer, model, port=port)
        try:
            assert (await client.embed(tone(301))).embedding.shape == (512,)  # reconnected by itself
            assert client.reconnects >= 1
        finally:
            await asyncio.to_thread(second.stop)
    finally:
        await client.close()


@pytest.mark.slow
def test_installs_and_runs_without_torch(srv, tmp_path):
    """pip install ./clients/python into a fresh venv (no torch), then a five-line script embeds sounds."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(ROOT / "clients" / "python")],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    script = (
        "import sys, numpy as np\n"
        "from clap_ws_client import ClapClient\n"
        f"with ClapClient({srv.url!r}) as client:\n"
        "    e = client.embed_batch([np.sin(np.arange(48000) / 7.0), np.random.default_rng(0).normal(size=24000)])\n"
        "import importlib.util\n"
        "print(e.shape, 'torch' in sys.modules, importlib.util.find_spec('torch') is None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    run = subprocess.run([str(python), "-c", script], capture_output=True, text=True, timeout=300, env=env,
                         cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["(2,", "512)", "False", "True"]


@pytest.mark.slow
def test_the_map_elites_example_runs_to_the_end(model):
    """examples/map_elites.py: pyribs' MAP-Elites, measures from /clap-bd descriptors, fitness from novelty."""
    with threaded(model, audio_cache=0) as server:
        env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python")}
        run = subprocess.run([sys.executable, str(ROOT / "clients" / "python" / "examples" / "map_elites.py"),
                              "--url", f"ws://127.0.0.1:{server.port}/clap-bd", "--iterations", "3", "--batch", "8"],
                             capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == ["iteration 1", "iteration 2", "iteration 3"]
    coverage = float(lines[-1].split()[1])
    assert 0 < coverage <= 1 and "of 144 cells; model untrained" in lines[-1]


def test_the_embed_a_folder_example_writes_one_array(srv, folder, tmp_path):
    import shutil

    copy = tmp_path / "sounds"
    shutil.copytree(folder, copy)
    for bad in ("broken.wav", "silent-empty.wav", "zero-bytes.wav"):  # a ten-line script, not a library builder
        (copy / bad).unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python")}
    run = subprocess.run([sys.executable, str(ROOT / "clients" / "python" / "examples" / "embed_folder.py"),
                          str(copy), srv.url], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    saved = np.load(copy / "embeddings.npz")
    assert saved["embeddings"].shape == (9, 512) and len(saved["paths"]) == 9


@pytest.mark.slow
async def test_a_pool_loses_a_replica_to_sigkill_and_answers_every_request_once(tmp_path):
    """Two replica processes; one is killed with SIGKILL while 40 calls are in flight: every call is answered
    once, with its own sound's embedding (the lost ones again, by the other replica); archives stay on one home."""
    from clap_ws_client import AsyncClapPool
    from helpers import Served, offline_env

    replicas = [Served([sys.executable, "-m", "clap_ws", "serve", "--untrained", "--port", "0", "--precision",
                        "fp32", "--audio-cache", "0"], offline_env(tmp_path / f"r{i}")) for i in range(2)]
    try:
        ports = [await asyncio.to_thread(r.wait_for_port) for r in replicas]
        sounds = [noise(seconds=1, seed=200 + i) for i in range(40)]
        async with AsyncClapPool([f"ws://127.0.0.1:{p}/clap" for p in ports], timeout=120, down_for=60) as pool:
            reference = await pool.embed_batch(sounds[:4])  # fp32: the same on both replicas
            home = pool.home("run")
            assert (await pool.archive_add("run", reference))["count"] == 4
            assert (await pool.archive_info("run"))["count"] == 4  # the same replica, every time

            async def kill_soon():
                await asyncio.sleep(0.2)  # calls on the wire to both (any CPU: a fixed wait could outlast them all)
                assert all(c.pending for c in pool.clients)  # both replicas have calls in flight
                replicas[1].proc.kill()  # SIGKILL: no goodbye, its in-flight calls are lost on the wire

            results, _ = await asyncio.gather(asyncio.gather(*(pool.embed(s) for s in sounds)), kill_soon())
            assert len(results) == 40
            for i in range(4):
                np.testing.assert_allclose(results[i].embedding, reference[i], atol=1e-5)
            assert len({r.embedding.tobytes() for r in results}) == 40  # each its own reply, none twice
            infos = await pool.info()
            assert [info.get("error") for info in infos] == [None, "down"] and infos[0]["model"] == "untrained"
            assert pool.healthy == [pool.clients[0]]
            again = await pool.embed_text(["still served"])  # by the replica left
            assert again.shape == (1, 512)
            if home is pool.clients[0]:  # the archive's home survived: it is still there
                assert (await pool.archive_info("run"))["count"] == 4
    finally:
        for r in replicas:
            r.kill()


def test_the_blocking_pool_spreads_calls_and_pins_archives(srv):
    from clap_ws_client import ClapPool

    with ClapPool([srv.url, srv.url.replace("127.0.0.1", "localhost")]) as pool:
        assert pool.embed_batch([tone(200), tone(300)]).shape == (2, 512)
        assert [info["model"] for info in pool.info()] == ["untrained", "untrained"]
        pool.archive_add("pinned", np.eye(512)[:3])
        assert pool.archive_info("pinned")["count"] == 3
        assert pool.novelty("pinned", np.eye(512)[:1], k=2).shape == (1,)
        with pytest.raises(TypeError, match="no raw request"):
            pool.request({"op": "info"})
