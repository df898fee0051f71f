"""Library builds on a real local Ray cluster: the same library as a local build, a worker killed mid-build, and a
driver killed with SIGKILL that resumes with nothing lost or doubled."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from helpers import ROOT, chirp, noise, offline_env, tone

from clap_ws.build import build
from clap_ws.search.library import Library

ray = pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]' (scripts/test.sh installs it)")
pytestmark = pytest.mark.slow
OPTIONS = {"untrained": True, "seed": 0, "audio_model": "HTSAT-tiny", "precision": "fp32"}


@pytest.fixture(scope="module")
def cluster():
    context = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-sounds")
    for kind, make in {"tones": lambda i: tone(200 + 100 * i, sr=16000, seconds=1),
                       "noise": lambda i: noise(sr=22050, seconds=0.8, seed=i),
                       "chirps": lambda i: chirp(100 + 40 * i, 3000, sr=16000, seconds=1.2)}.items():
        (root / kind).mkdir()
        for i in range(4):
            sf.write(root / kind / f"{kind}{i}.wav", make(i), 16000 if kind != "noise" else 22050)
    (root / "broken.wav").write_bytes(b"RIFF not audio")
    return root


@pytest.fixture(scope="module")
def local(fp32_model, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ray-local") / "lib.npz"
    build(fp32_model, folder, out, batch=2, progress=False)
    return Library.load(out)


def same_library(a: Library, b: Library) -> None:
    strip = ("mtime_ns",)
    assert [{k: v for k, v in it.items() if k not in strip} for it in a.items] == \
        [{k: v for k, v in it.items() if k not in strip} for it in b.items]
    assert a.model == b.model and len(a) == len(b) == 12
    np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-6)  # fp32 on both sides


def test_a_ray_build_makes_the_local_library_even_when_a_worker_dies(cluster, fp32_model, folder, local, tmp_path):
    from clap_ws.ray_build import RayEmbedder

    embedder = RayEmbedder(OPTIONS, 600.0, workers=2)
    killed = []

    def kill_a_busy_worker(embedded: int) -> None:
        if not killed and embedder.busy:
            killed.append(embedder.busy[0])
            ray.kill(embedder.busy[0])  # mid-build, with a batch in flight

    try:
        out = tmp_path / "lib.npz"
        report = build(fp32_model, folder, out, batch=2, progress=False, embedder=embedder,
                       on_batch=kill_a_busy_worker)
    finally:
        embedder.close()
    assert killed and embedder.retried >= 1 and report.embedded == 12
    assert report.skipped == [("broken.wav", report.skipped[0][1])]
    same_library(local, Library.load(out))


def test_a_driver_killed_mid_build_resumes_with_nothing_lost_or_doubled(cluster, folder, local, tmp_path):
    out = tmp_path / "lib.npz"
    command = [sys.executable, "-m", "clap_ws", "library", "build", str(folder), "--out", str(out), "--untrained",
               "--precision", "fp32", "--batch", "2", "--ray", cluster, "--workers", "2", "--no-progress"]
    env = offline_env(tmp_path)
    driver = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    journal = out.with_name(out.name + ".journal")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(journal.glob("chunk-*.npz"))) < 2 and driver.poll() is None:
        time.sleep(0.05)
    assert driver.poll() is None, driver.stderr.read().decode()
    os.kill(driver.pid, signal.SIGKILL)  # mid-build: some chunks written, the rest not
    driver.wait(30)
    assert not out.exists() and len(list(journal.glob("chunk-*.npz"))) >= 2
    resumed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and " resumed 0," not in resumed.stdout
    same_library(local, Library.load(out))
