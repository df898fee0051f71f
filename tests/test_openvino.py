"""``--engine openvino``: the audio encoder compiled by OpenVINO gives torch's embeddings, in the model and a server."""

import asyncio
import importlib.util
import json
import logging
import sys
import urllib.request

import numpy as np
import pytest
import torch
import websockets
from helpers import (
    Served,
    chirp,
    cosine,
    noise,
    offline_env,
    running_server,
    tone,
)

from clap_ws import tolerance
from clap_ws.errors import ModelError
from clap_ws.model import ClapModel
from clap_ws.model.checkpoint import Architecture
from clap_ws.model.engine_choice import MARGIN, choose_engine
from clap_ws.model.weights import load_model
from clap_ws.tolerance import engine_min_cosine

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="needs openvino: pip install -e '.[engines]'")


def ten_second_windows() -> np.ndarray:
    return np.stack([tone(330, seconds=10), noise(seconds=10, seed=4), chirp(seconds=10)]).astype(np.float32)


@needs_openvino
@pytest.mark.slow
def test_openvino_fp32_gives_torch_fp32s_embeddings(fp32_model, caplog):
    caplog.set_level(logging.INFO)
    engine = ClapModel.untrained(seed=0, precision="fp32", chunk=2, engine="openvino")
    exporting = [r.name for r in caplog.records if r.name.startswith(("clap_ws.model", "torch", "onnx"))]
    assert exporting == ["clap_ws.model.openvino_audio"], exporting  # its own line, none of the exporter's hundreds
    assert engine._openvino.sizes == [1, 2] and engine.describe()["engine"].startswith("openvino 20")
    assert engine._openvino.compiled == []  # each shape compiles on its first call
    assert fp32_model.describe()["engine"] == "torch"
    windows = ten_second_windows()
    ours, torch_ = engine.embed_windows(windows), fp32_model.embed_windows(windows)  # a call of 2, then of 1
    for a, b in zip(ours, torch_):
        assert cosine(a, b) >= 0.9999
    assert engine._openvino.calls == {2: 1, 1: 1} and engine._openvino.compiled == [1, 2]
    gap = max(np.linalg.norm(a - b) for a, b in zip(ours, torch_))
    assert gap > 0  # OpenVINO's kernels round differently: these did not come from torch
    assert np.linalg.norm(ours[0] - ours[1]) > 20 * gap and np.linalg.norm(ours[1] - ours[2]) > 20 * gap


@needs_openvino
@pytest.mark.slow
def test_openvino_engine_in_its_default_precision_through_a_real_server(tmp_path, fp32_model):
    server = Served([sys.executable, "-m", "clap_ws", "serve", "--untrained", "--engine", "openvino", "--chunk", "1",
                     "--port", "0"], offline_env(tmp_path))
    clips = [tone(440, seconds=2), chirp(seconds=13)]  # one window; two windows, one call each

    async def embed(port):
        async with websockets.connect(f"ws://127.0.0.1:{port}/?sample_rate=48000", max_size=None) as ws:
            await ws.send(json.dumps({"op": "info"}))
            info = json.loads(await asyncio.wait_for(ws.recv(), 120))
            replies = []
            for clip in clips:
                await ws.send(clip.tobytes())
                replies.append(json.loads(await asyncio.wait_for(ws.recv(), 120)))
            return info, replies

    async def reference():
        async with running_server(fp32_model) as srv:
            return (await embed(srv.port))[1]

    try:
        info, replies = asyncio.run(embed(server.wait_for_port(timeout=300)))
        expected = asyncio.run(reference())
    finally:
        server.kill()
    assert info["engine"].startswith("openvino ") and info["chunk"] == 1 and info["untrained"] is True
    assert "| precision " + info["precision"] + " | engine " + info["engine"] + " |" in server.log()
    for reply, want in zip(replies, expected):
        assert reply["status"] == "OK" and reply["model"] == "untrained"
        assert cosine(reply["embedding"], want["embedding"]) >= 0.999  # bf16 where the CPU has it, else fp32
    assert cosine(replies[0]["embedding"], replies[1]["embedding"]) < 0.9999


def test_openvino_engine_refuses_what_it_cannot_run(model):
    def build(**options):
        fields = dict(net=model.net, architecture=model.architecture, identity=model.identity, device=model.device,
                      precision=model.precision, engine="openvino")
        return ClapModel(**{**fields, **options})

    with pytest.raises(ModelError, match="unknown engine 'tensorrt'"):
        build(engine="tensorrt")
    with pytest.raises(ModelError, match="pick one"):
        build(compile=True)
    with pytest.raises(ModelError, match="runs on the CPU, not on meta"):
        build(device=torch.device("meta"))
    with pytest.raises(ModelError, match="non-fusion checkpoints only"):
        ClapModel.untrained(Architecture("HTSAT-tiny", "aff_2d"), engine="openvino")


def test_openvino_engine_without_its_packages_says_how_to_install_them(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    with pytest.raises(ModelError, match=r"OpenVINO is not installed \(openvino: pip install 'clap-ws\[openvino\]'\)"):
        ClapModel.untrained(engine="openvino")
    choice = choose_engine(ClapModel.untrained(precision="fp32"), "fp32", rounds=1).engine_choice
    assert choice.chosen == "torch" and "OpenVINO is not installed" in choice.left_out["openvino"]


def test_engine_auto_says_why_openvino_cannot_run():
    fusion = ClapModel.untrained(Architecture("HTSAT-tiny", "aff_2d"), precision="fp32")
    choice = choose_engine(fusion, "fp32", rounds=1).engine_choice
    assert choice.chosen == "torch" and set(choice.ms_per_window) == {"torch"}
    assert "non-fusion checkpoints only" in choice.left_out["openvino"]


@needs_openvino
@pytest.mark.slow
def test_engine_auto_measures_checks_and_serves_with_the_faster(tmp_path, fp32_model):
    """load_model(engine="auto"): both engines measured on the model in its precision, each checked against torch
    fp32, the faster kept (torch unless another is MARGIN faster); a restart reads OpenVINO's export from disk."""
    model = load_model(untrained=True, engine="auto", cache=tmp_path)
    choice = model.describe()["engine_auto"]
    ms = choice["ms_per_window"]
    assert set(ms) == {"torch", "openvino"} and all(v > 0 for v in ms.values())
    assert min(choice["cosine_to_torch_fp32"].values()) >= engine_min_cosine(model.precision)
    if choice["chosen"] == "openvino":
        assert ms["openvino"] <= MARGIN * ms["torch"] and model.describe()["engine"].startswith("openvino")
        assert model._openvino.compiled == [model.chunk]  # timed on one shape; warm_up compiles the rest
    else:
        assert choice["chosen"] == "torch" and "openvino" in choice["left_out"] and model.engine == "torch"
    windows = ten_second_windows()
    ours, truth = model.embed_windows(windows), fp32_model.embed_windows(windows)
    assert tolerance.disagreement(ours, truth)[1] >= engine_min_cosine(model.precision)
    assert list((tmp_path / "engines").glob("*.onnx"))  # the export, kept for the next start
    again = load_model(untrained=True, engine="openvino", cache=tmp_path)
    assert again._openvino.cached


@needs_openvino
@pytest.mark.slow
def test_engine_auto_serves_with_torch_when_openvino_fails(tmp_path):
    """An OpenVINO that cannot load (here a broken package ahead of the real one) is left out, said once, and
    torch serves; info and /metrics name the engine and the times."""
    broken = tmp_path / "shadow" / "openvino"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('this OpenVINO is broken on purpose')\n")
    env = offline_env(tmp_path)
    env["PYTHONPATH"] = f"{broken.parent}:{env['PYTHONPATH']}"
    del env["CLAP_WS_ENGINE"]  # the default, auto
    server = Served([sys.executable, "-m", "clap_ws", "serve", "--untrained", "--port", "0"], env)

    async def ask_info(port):
        async with websockets.connect(f"ws://127.0.0.1:{port}/clap", max_size=None) as ws:
            await ws.send(json.dumps({"op": "info"}))
            return json.loads(await asyncio.wait_for(ws.recv(), 120))

    try:
        port = server.wait_for_port(timeout=300)
        info = asyncio.run(ask_info(port))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    finally:
        server.kill()
    assert info["engine"] == "torch" and info["engine_auto"]["chosen"] == "torch"
    assert "broken on purpose" in info["engine_auto"]["left_out"]["openvino"]
    assert server.log().count("engine openvino left out: failed to build") == 1
    assert server.log().count("engine auto chose torch") == 1  # said once
    line = next(line for line in metrics.splitlines() if line.startswith("clap_ws_build_info"))
    assert 'engine="torch"' in line and 'engine_ms_per_window="torch=' in line
