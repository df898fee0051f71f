"""Shared fixtures: one untrained model per session, real servers on loopback, real audio.

Everything runs with ``HF_HUB_OFFLINE=1``: the suite proves clap-ws needs no
network. The model is built once and shared; each server test
gets its own :class:`ClapServer` on 127.0.0.1 with an OS-chosen port.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
from helpers import running_server, write_laion_checkpoint, write_sounds

from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import Architecture


def pytest_report_header(config):
    """The CPU class this run's kernels see (``ONEDNN_MAX_CPU_ISA`` included): every figure and failure names it."""
    import torch

    from clap_ws import cpu
    from clap_ws.model import resolve_precision

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "none")
    return [f"cpu class: {cpu.instruction_set()} (ONEDNN_MAX_CPU_ISA={cap}; precision auto = "
            f"{resolve_precision('auto', torch.device('cpu'))}; {cpu.describe()})"]


def pytest_addoption(parser):
    parser.addoption("--run-soak", action="store_true", help="also run the long all-audio soak (minutes)")


def pytest_collection_modifyitems(config, items):
    """``soak`` tests are opt-in; ``slow`` ones run by default and are left out by ``-m "not slow"``."""
    if config.getoption("--run-soak"):
        return
    skip = pytest.mark.skip(reason="long soak: opt in with --run-soak")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture
async def server(model):
    async with running_server(model) as srv:
        yield srv




@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    """A folder of real audio files in every supported format, nested, plus three bad ones (helpers.write_sounds).
    Shared: tests that change files copy it first."""
    root = tmp_path_factory.mktemp("sounds")
    write_sounds(root)
    return root


@pytest.fixture(scope="session")
def library_file(model, folder, tmp_path_factory):
    """The library ``clap-ws library build`` makes of ``folder`` with the untrained model: 9 items."""
    from clap_ws.build import build

    out = tmp_path_factory.mktemp("lib") / "sounds.npz"
    report = build(model, folder, out, batch=4, progress=False)
    assert report.embedded == 9 and report.total == 9
    return out
