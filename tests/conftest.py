"""Shared fixtures: one untrained model per session, real servers on loopback, real audio.

Everything runs with ``HF_HUB_OFFLINE=1``: the suite proves clap-ws needs no
network. The model is built once (about 8 s) and shared; each server test
gets its own :class:`ClapServer` on 127.0.0.1 with an OS-chosen port.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import asyncio
import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import websockets

from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import Architecture
from clap_ws.server import ClapServer, ServerConfig

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run long soak tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long soak: opt in with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


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


def cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- checkpoints in laion-clap's own format --------------------------------
def write_laion_checkpoint(net: torch.nn.Module, path: Path) -> Path:
    """Save like laion-clap's training loop: DDP ``module.`` keys, position_ids kept."""
    state = {"module." + k: v.clone() for k, v in net.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(514).expand((1, -1))
    torch.save({"epoch": 45, "name": "test", "state_dict": state}, path)
    return path


# ---- model and servers -------------------------------------------------------------
@pytest.fixture(scope="session")
def model() -> ClapModel:
    return ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0, precision="auto")


@pytest.fixture(scope="session")
def fp32_model() -> ClapModel:
    """The same weights in fp32 (a second build: a bf16 model casts its own network's weights)."""
    return ClapModel.untrained(Architecture("HTSAT-tiny"), seed=0, precision="fp32")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    net = ClapModel.untrained(Architecture("HTSAT-tiny"), seed=1, precision="fp32").net
    return write_laion_checkpoint(net, tmp_path_factory.mktemp("ckpt") / "630k-audioset-best.pt")


@contextlib.asynccontextmanager
async def running_server(model: ClapModel, *, libraries=(), archives=None, projection=None, **options):
    server = ClapServer(model, ServerConfig(port=0, **options), libraries=libraries, archives=archives,
                        projection=projection)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


@pytest.fixture
async def server(model):
    async with running_server(model) as srv:
        yield srv


def url(server, path: str = "/clap", query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}{path}" + (f"?{query}" if query else "")


def connect(server, path: str = "/clap", query: str = "", **kw):
    return websockets.connect(url(server, path, query), max_size=None, **kw)


REPLY_TIMEOUT = 120  # seconds: a test waiting longer has found a lost reply


async def ask(ws, message) -> dict:
    """Send one message and parse the (text) reply."""
    await ws.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))
