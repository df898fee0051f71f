"""What the tests share: real audio, real servers on 127.0.0.1, clients, checkpoints, an offline environment.

Plain functions, imported by the test files (fixtures live in conftest.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import websockets

from clap_ws import tolerance
from clap_ws.model import ClapModel
from clap_ws.server import ClapServer, ServerConfig

ROOT = Path(__file__).resolve().parent.parent
# OpenVINO's export and compiled code for the processes the tests start (keyed by model and versions): shared,
# so that only the first server of a run pays for --engine auto's export
ENGINE_CACHE = Path(tempfile.gettempdir()) / f"clap-ws-test-engines-{os.getuid()}"


# ---- audio ----------------------------------------------------------------
def tone(freq: float = 440.0, sr: int = 48_000, seconds: float = 2.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(sr: int = 48_000, seconds: float = 2.0, seed: int = 0, amp: float = 0.3) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(sr * seconds))).astype(np.float32)


def chirp(f0: float = 100.0, f1: float = 8000.0, sr: int = 48_000, seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    k = (f1 - f0) / seconds
    return (0.4 * np.sin(2 * np.pi * (f0 * t + 0.5 * k * t * t))).astype(np.float32)


def write_sounds(root, n_kicks=3, n_pads=3):
    """A small folder of real files in every supported format, nested, plus three bad ones."""
    (root / "drums" / "kicks").mkdir(parents=True)
    (root / "pads").mkdir()
    sr = 22050
    t = np.arange(sr) / sr
    for i in range(n_kicks):
        kick = 0.8 * np.sin(2 * np.pi * (50 + 15 * i) * t) * np.exp(-6 * t)
        sf.write(root / "drums" / "kicks" / f"kick{i}.wav", kick.astype("f4"), sr)
    for i in range(n_pads):
        sf.write(root / "pads" / f"pad{i}.flac", (0.3 * np.sin(2 * np.pi * (220 * (i + 1)) * t)).astype("f4"), sr)
    sf.write(root / "pads" / "wide.ogg", 0.1 * np.random.default_rng(0).standard_normal((sr, 2)).astype("f4"), sr)
    sf.write(root / "noise.mp3", 0.1 * np.random.default_rng(1).standard_normal(sr).astype("f4"), sr)
    sf.write(root / "bell.aiff", chirp(sr=sr, seconds=1), sr, subtype="PCM_16")
    (root / "broken.wav").write_bytes(b"RIFF\x00\x00not really a wave file")
    sf.write(root / "silent-empty.wav", np.zeros(0, "f4"), sr)
    (root / "zero-bytes.wav").write_bytes(b"")
    (root / "notes.txt").write_text("not audio")


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- the tolerance policy (clap_ws.tolerance, docs/precision.md) ----------------------
def assert_same_embeddings(a, b, precision: str) -> None:
    """``a`` and ``b`` embed the same inputs in ``precision``, possibly in different batches: strict in fp32,
    within the measured bf16 bound otherwise. Not for repeats served by the audio cache, which are bit-equal."""
    max_abs, min_cos = tolerance.bounds(precision)
    worst_abs, worst_cos = tolerance.disagreement(a, b)
    assert worst_abs <= max_abs and worst_cos >= min_cos, \
        f"{precision}: max abs {worst_abs:.3g} (bound {max_abs:.3g}), min cosine {worst_cos:.7f} (bound {min_cos})"


def score_tolerance(precision: str) -> float:
    """How far a search score may move when one of its two unit embeddings comes from another batch:
    ``|q.(x - y)| <= |x - y| = sqrt(2 (1 - cos))`` at the precision's cosine bound, plus float32 rounding."""
    max_abs, min_cos = tolerance.bounds(precision)
    return min(max_abs * np.sqrt(tolerance.EMBED_DIM), float(np.sqrt(2 * (1 - min_cos)))) + tolerance.FLOAT32_DOT_TOL


def assert_ranked(ids, scores, truth, k: int, tol: float = tolerance.FLOAT32_DOT_TOL) -> None:
    """``ids`` with ``scores`` are a correct top ``k`` of ``truth`` (every candidate's true score, by id):
    each score is its id's within ``tol``, the order and the set are the true ones except among ties (true
    scores within ``2 tol`` of each other may come in either order; that is float32's rounding, not a bug)."""
    ids, scores, truth = list(np.ravel(ids)), np.ravel(scores), {int(i): float(s) for i, s in truth.items()}
    assert len(ids) == min(k, len(truth)) and len(set(ids)) == len(ids), ids
    true = np.array([truth[int(i)] for i in ids])
    assert np.all(np.abs(scores - true) <= tol), (scores, true)  # each score belongs to its id
    assert np.all(np.diff(true) <= 2 * tol), true  # in order, up to ties
    left = [s for i, s in truth.items() if i not in set(map(int, ids))]
    assert not left or not len(true) or max(left) <= true.min() + 2 * tol  # nothing better left out


# ---- checkpoints in laion-clap's own format --------------------------------
def write_laion_checkpoint(net: torch.nn.Module, path: Path) -> Path:
    """Save like laion-clap's training loop: DDP ``module.`` keys, position_ids kept."""
    state = {"module." + k: v.clone() for k, v in net.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514).expand((1, -1))
    torch.save({"epoch": 45, "name": "test", "state_dict": state}, path)
    return path


def b64(x) -> str:
    """float32 samples (or an embedding) as the protocol's base64 little-endian bytes."""
    return base64.b64encode(np.asarray(x, "<f4").tobytes()).decode()


# ---- servers and clients -------------------------------------------------------------
REPLY_TIMEOUT = 120  # seconds: a test waiting longer has found a lost reply


class ThreadedServer:
    """The one way the tests run a ClapServer in-process: on its own event loop in a background thread, on
    127.0.0.1 with an OS-chosen port, so clients in the test (sync or async) load it as separate processes
    would. Processes (the CLI, replicas) are :class:`Served`."""

    def __init__(self, model: ClapModel, *, libraries=(), archives=None, projection=None, **options):
        self.server = ClapServer(model, ServerConfig(**{"port": 0, **options}), libraries=libraries,
                                 archives=archives, projection=projection)
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        failed: list[BaseException] = []

        def run():
            asyncio.set_event_loop(self.loop)
            try:
                self.loop.run_until_complete(self.server.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the test below
                failed.append(exc)
                started.set()
                return
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="test-server", daemon=True)
        self.thread.start()
        assert started.wait(REPLY_TIMEOUT)
        if failed:
            raise failed[0]
        self.port = self.server.port
        self.url = f"ws://127.0.0.1:{self.port}/clap"

    def call(self, fn):
        """Run the coroutine function ``fn`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(REPLY_TIMEOUT)

    def stop(self):
        self.call(self.server.shutdown)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@contextlib.contextmanager
def threaded(model: ClapModel, **options):
    srv = ThreadedServer(model, **options)
    try:
        yield srv
    finally:
        srv.stop()


@contextlib.asynccontextmanager
async def running_server(model: ClapModel, **options):
    """:class:`ThreadedServer` for async tests: yields its :class:`ClapServer` (``port``, ``service``, ...)."""
    srv = await asyncio.to_thread(ThreadedServer, model, **options)
    try:
        yield srv.server
    finally:
        await asyncio.to_thread(srv.stop)


@contextlib.contextmanager
def held_model(model: ClapModel):
    """Hold the model thread inside its next audio batch until ``release`` is set: ``(inside, release)`` events.

    What a test needs to queue work behind a batch in progress on any CPU, where a batch sized "long enough"
    is not (an AMX core runs it several times faster). Install after the server's warm-up, which embeds silence.
    """
    inside, release = threading.Event(), threading.Event()
    original = model.embed_windows

    def held(windows):
        inside.set()
        release.wait(30)
        return original(windows)

    model.embed_windows = held
    try:
        yield inside, release
    finally:
        release.set()
        del model.embed_windows


async def until(condition, seconds: float = 5.0) -> bool:
    """Poll ``condition()`` every 20 ms for at most ``seconds``; whether it came true."""
    for _ in range(max(1, int(seconds / 0.02))):
        if condition():
            return True
        await asyncio.sleep(0.02)
    return bool(condition())


def url(server, path: str = "/clap", query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}{path}" + (f"?{query}" if query else "")


def connect(server, path: str = "/clap", query: str = "", **kw):
    return websockets.connect(url(server, path, query), max_size=None, **kw)


async def ask(ws, message) -> dict:
    """Send one message and parse the (text) reply."""
    await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))


# ---- processes ---------------------------------------------------------------------
def offline_env(tmp_path, **extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CLAP_WS_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT), PYTHON=sys.executable, CLAP_WS_ENGINE_CACHE=str(ENGINE_CACHE),
               CLAP_WS_ENGINE="torch")  # servers the tests start run torch on every CPU; tests of auto drop this
    env.pop("CLAP_CHECKPOINT_PATH", None)
    env.update(extra)
    return env


class Served:
    """A process started in the background; stderr is collected to find its port."""

    def __init__(self, args, env, **popen):
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     **popen)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for_port(self, timeout=120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)/clap", line):
                    return int(m.group(1))
            if self.proc.poll() is not None:
                raise AssertionError("server exited:\n" + "".join(self.lines))
            time.sleep(0.1)
        raise AssertionError("server did not start:\n" + "".join(self.lines))

    def log(self) -> str:
        return "".join(self.lines)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
