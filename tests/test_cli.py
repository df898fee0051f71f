"""The command line as a user runs it: real processes, signals, downloads from a local HTTP server."""

import asyncio
import functools
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import websockets
from helpers import ROOT, Served, noise, offline_env, tone

from clap_ws.errors import ModelError
from clap_ws.model import weights
from clap_ws.model.tokenizer import byte_level_tokenizer


def test_serve_without_checkpoint_fails_fast_and_says_how_to_fix_it(tmp_path):
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "clap_ws", "serve", "--port", "0"], env=offline_env(tmp_path),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert time.monotonic() - started < 60
    for words in ("630k-audioset-best.pt", "CLAP_CHECKPOINT_PATH", "clap-ws download", "--untrained"):
        assert words in result.stderr


def test_binding_beyond_loopback_needs_a_token_or_insecure(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clap_ws", "serve", "--untrained", "--host", "0.0.0.0"],
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--token" in result.stderr and "--insecure" in result.stderr


def test_start_script_untrained_then_sigterm_under_load(tmp_path):
    server = Served([str(ROOT / "start_clap_service.sh"), "--untrained"], offline_env(tmp_path, PORT="0"))
    try:
        port = server.wait_for_port()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["model"] == "untrained"

        async def load():
            async with websockets.connect(f"ws://127.0.0.1:{port}/clap?sample_rate=44100") as ws:
                for i in range(6):
                    await ws.send(noise(sr=44100, seconds=1, seed=i).tobytes())
                await asyncio.sleep(0.2)
                server.proc.send_signal(signal.SIGTERM)  # while requests are in flight
                await asyncio.sleep(0.3)
                with pytest.raises((OSError, websockets.InvalidStatus)):  # new connections are refused
                    await websockets.connect(f"ws://127.0.0.1:{port}/clap", open_timeout=5)
                replies = [json.loads(await ws.recv()) for _ in range(6)]
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                return replies, ws.close_code

        replies, code = asyncio.run(load())
        assert [r["status"] for r in replies] == ["OK"] * 6 and code == 1001
        assert server.proc.wait(timeout=60) == 0
        assert 'model: "untrained" - RANDOM WEIGHTS' in server.log()
        assert "Warning" not in server.log(), server.log()  # e.g. laion-clap's torch.meshgrid call
    finally:
        server.kill()


def test_checkpoint_from_environment_and_sigint(tmp_path, tiny_checkpoint):
    env = offline_env(tmp_path, CLAP_CHECKPOINT_PATH=str(tiny_checkpoint), CLAP_DEVICE="cpu")
    server = Served([sys.executable, "-m", "clap_ws", "serve", "--port", "0", "--precision", "fp32"], env)
    try:
        port = server.wait_for_port()

        async def talk():
            async with websockets.connect(f"ws://127.0.0.1:{port}/") as ws:
                await ws.send(json.dumps({"op": "info"}))
                info = json.loads(await ws.recv())
                await ws.send(tone(seconds=1).tobytes())
                return info, json.loads(await ws.recv())

        info, reply = asyncio.run(talk())
        assert info["model"] == "630k-audioset-best.pt" and info["untrained"] is False
        assert info["checkpoint_sha256"] == weights_sha(tiny_checkpoint)
        assert info["precision"] == "fp32" and info["device"] == "cpu" and info["text"] is False
        assert reply["model"] == "630k-audioset-best.pt"
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0
        assert "text features are unavailable" in server.log()
    finally:
        server.kill()


def weights_sha(path):
    from clap_ws.model.checkpoint import sha256_of

    return sha256_of(path)


# ---- downloads, from a local HTTP server ------------------------------------------
@pytest.fixture
def mirror(tmp_path, tiny_checkpoint):
    """A loopback HTTP server holding a checkpoint and roberta-style tokenizer files."""
    root = tmp_path / "mirror"
    (root / "ckpt").mkdir(parents=True)
    (root / "tok").mkdir()
    (root / "ckpt" / "630k-audioset-best.pt").write_bytes(tiny_checkpoint.read_bytes())
    (root / "tok" / "vocab.json").write_text(json.dumps(byte_level_tokenizer().get_vocab()))
    (root / "tok" / "merges.txt").write_text("#version: 0.2\n")
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            requests.append(self.path)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield base, requests
    httpd.shutdown()


def test_download_fetches_checkpoint_and_tokenizer_once(tmp_path, mirror, tiny_checkpoint):
    base, requests = mirror
    cache = tmp_path / "cache"
    path = weights.download("630k-audioset-best.pt", cache, base_url=base + "/ckpt/",
                            tokenizer_url=base + "/tok/", progress=False)
    assert path.read_bytes() == tiny_checkpoint.read_bytes()
    assert (cache / "roberta-base" / "vocab.json").is_file() and (cache / "roberta-base" / "merges.txt").is_file()
    assert not list(cache.rglob("*.part"))
    fetched = len(requests)
    weights.download("630k-audioset-best.pt", cache, base_url=base + "/ckpt/", tokenizer_url=base + "/tok/",
                     progress=False)
    assert len(requests) == fetched == 3  # nothing fetched twice
    # the cache is now enough: default checkpoint and the tokenizer, offline
    model = weights.load_model(cache=cache, precision="fp32")
    assert model.identity.name == "630k-audioset-best.pt" and model.tokenizer is not None
    assert model.embed_text(["a bell"]).shape == (1, 512)


def test_download_cli(tmp_path, mirror):
    base, _ = mirror
    env = offline_env(tmp_path, CLAP_WS_CHECKPOINT_URL=base + "/ckpt/", CLAP_WS_TOKENIZER_URL=base + "/tok/")
    result = subprocess.run([sys.executable, "-m", "clap_ws", "download", "--cache-dir", str(tmp_path / "c")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()) == tmp_path / "c" / "630k-audioset-best.pt"
    assert (tmp_path / "c" / "630k-audioset-best.pt").stat().st_size > 1_000_000


def test_failed_download_is_quick_and_leaves_nothing(tmp_path, mirror):
    base, _ = mirror
    started = time.monotonic()
    with pytest.raises(ModelError, match="nothing was retried"):
        weights.download("630k-best.pt", tmp_path / "cache", base_url=base + "/missing/", progress=False)
    with pytest.raises(ModelError, match="failed"):
        weights.download("630k-best.pt", tmp_path / "cache", base_url="http://127.0.0.1:9/", progress=False,
                         timeout=2)
    assert time.monotonic() - started < 10
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*"))


def test_load_model_builds_on_a_thread_that_ends_and_reraises_its_errors(tmp_path, monkeypatch):
    """Building leaves no OpenMP pool on the caller's thread (see weights.load_model)."""
    from clap_ws.model import ClapModel

    seen = []
    original = ClapModel.untrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(threading.current_thread())
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(ClapModel, "untrained", classmethod(spy))
    model = weights.load_model(untrained=True, precision="fp32", chunk=2)
    assert model.chunk == 2 and model.identity.untrained
    assert len(seen) == 1 and seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ModelError, match="missing.pt not found"):  # raised on the builder, re-raised here
        weights.load_model(tmp_path / "missing.pt")


def test_open_file_limit_is_raised_or_max_connections_capped(tmp_path):
    """With ulimit -n 300 and --max-connections 1024, 1,040 clients used to exhaust descriptors (EMFILE)."""
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))

    server = Served([sys.executable, "-m", "clap_ws", "serve", "--untrained", "--port", "0", "--no-warm-up"],
                    offline_env(tmp_path), preexec_fn=limited)
    try:
        port = server.wait_for_port()
        assert "at most 236 connections are taken" in server.log()
        clients, refused = [], 0
        from websockets.sync.client import connect as sync_connect

        for _ in range(250):
            ws = sync_connect(f"ws://127.0.0.1:{port}/clap", open_timeout=30)
            clients.append(ws)
        for ws in clients[236:]:
            try:
                ws.recv(timeout=30)
            except websockets.ConnectionClosed as exc:
                refused += exc.rcvd is not None and exc.rcvd.code == 1013
        assert refused == 14
        clients[0].send(json.dumps({"op": "info"}))
        assert json.loads(clients[0].recv(timeout=60))["status"] == "OK"
        for ws in clients:
            ws.close()
        assert "Too many open files" not in server.log()
    finally:
        server.kill()


def test_json_logs_one_line_per_event_not_per_connection(tmp_path):
    """Operators' log: JSON lines with --log-format json; no websockets line per connection; error replies summed
    up at info (each one only at debug)."""
    server = Served([sys.executable, "-m", "clap_ws", "--log-format", "json", "serve", "--untrained", "--port", "0",
                     "--no-warm-up"], offline_env(tmp_path))
    try:
        port = server.wait_for_port()

        async def traffic():
            for _ in range(5):  # five connections, each with a bad request
                async with websockets.connect(f"ws://127.0.0.1:{port}/clap") as ws:
                    await ws.send("not json")
                    assert json.loads(await ws.recv())["error"]["code"] == "bad_json"

        asyncio.run(traffic())
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.kill()
    entries = [json.loads(line) for line in server.lines if line.strip()]  # every line is JSON
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    messages = [e["message"] for e in entries]
    assert not any("connection open" in m or "connection closed" in m for m in messages)
    assert any(m.startswith("error replies since the last such line: bad_json") for m in messages)
    assert any("clap-ws stopped" in m for m in messages) and len(entries) < 20


def test_a_missing_checkpoint_names_untrained_as_the_way_to_try_things(tmp_path):
    result = subprocess.run([sys.executable, "-m", "clap_ws", "serve", "--checkpoint", str(tmp_path / "nope.pt"),
                             "--port", "0"], env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not found" in result.stderr and "--untrained" in result.stderr
