"""Behaviour descriptors the server learns: PCA and triplet fits, people's triplets, files, and online fits."""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from helpers import ask, b64, connect, noise, running_server

from clap_ws import cli
from clap_ws.errors import ClapError, ErrorCode
from clap_ws.projection import Projection
from clap_ws.projection.fit import FitOptions, fit
from clap_ws.projection.quality import triplet_agreement
from clap_ws.search.archive import Archives
from clap_ws.similarity import unit


def clusters(centres: np.ndarray, per: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(centres)), per)
    return unit(centres[labels] + spread * rng.standard_normal((len(labels), 512))).astype(np.float32), labels


def test_pca_matches_numpys_svd_and_scales_to_the_unit_interval():
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((200, 512)) * np.linspace(3, 0.1, 512)).astype(np.float32)
    projection = fit(x, FitOptions(dims=3, method="pca"))
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = projection.arrays["components"]
    for ours, theirs in zip(components, vt[:3]):
        assert abs(float(ours @ theirs)) == pytest.approx(1, abs=1e-4)  # the same direction, up to sign
    out = projection(x)
    np.testing.assert_allclose(out.min(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(out.max(axis=0), 1, atol=1e-6)
    assert projection.clipped == 0
    outside = projection(x[:5] * 50)  # far outside the fitted range: clipped into [0, 1], and counted
    assert outside.min() >= 0 and outside.max() <= 1 and projection.clipped > 0
    assert projection.describe()["clipped"] == projection.clipped


def test_triplet_fit_orders_like_clap_far_better_than_a_random_projection():
    rng = np.random.default_rng(2)
    directions = np.linalg.qr(rng.standard_normal((512, 3)))[0].T  # the structure lies along 3 known directions
    x = unit(rng.standard_normal((300, 3)) @ directions + 0.08 * rng.standard_normal((300, 512))).astype(np.float32)
    projection = fit(x, FitOptions(dims=3, epochs=20))
    figures = projection.meta["figures"]
    assert figures["fitted"]["triplet_agreement"] > 0.9
    assert figures["fitted"]["triplet_agreement"] > figures["random"]["triplet_agreement"] + 0.15
    assert figures["fitted"]["neighbours_kept_at_10"] > figures["random"]["neighbours_kept_at_10"]
    out = projection(x)
    assert out.shape == (300, 3) and out.min() >= 0 and out.max() <= 1


def test_people_who_disagree_with_clap_change_the_ordering():
    rng = np.random.default_rng(3)
    a = unit(rng.standard_normal(512))
    b = unit(a + 0.3 * unit(rng.standard_normal(512)))  # CLAP: B sounds like A
    c = unit(rng.standard_normal(512))  # and C does not
    x, labels = clusters(np.stack([a, b, c]), 30, 0.02, seed=4)
    A, B, C = (np.flatnonzero(labels == k) for k in range(3))
    human = np.array([(i, C[j % 30], B[j % 30]) for j, i in enumerate(np.repeat(A, 4))])  # people: C is closer
    clap_only = fit(x, FitOptions(dims=2, seed=0))
    with_people = fit(x, FitOptions(dims=2, seed=0), human=human)
    assert triplet_agreement(clap_only, x, human) < 0.3
    assert with_people.meta["figures"]["fitted"]["human_triplet_agreement"] > 0.8
    assert triplet_agreement(with_people, x, human) > 0.8


def test_files_round_trip_and_fits_are_reproducible(tmp_path):
    x, _ = clusters(unit(np.random.default_rng(5).standard_normal((4, 512))), 10, 0.05)
    first = fit(x, FitOptions(dims=2, epochs=3, seed=7))
    second = fit(x, FitOptions(dims=2, epochs=3, seed=7))
    for key in first.arrays:
        np.testing.assert_array_equal(first.arrays[key], second.arrays[key])
    first.save(tmp_path / "bd.npz")
    loaded = Projection.load(tmp_path / "bd.npz")
    np.testing.assert_allclose(loaded(x), first(x), atol=1e-6)
    assert loaded.meta["method"] == "triplet" and loaded.dims == 2


@pytest.mark.parametrize("items, options, words", [
    (10, FitOptions(), "at least 16"),
    (100, FitOptions(dims=0), "dims must be"),
    (100, FitOptions(dims=40), "dims must be"),
    (100, FitOptions(method="umap"), "method must be"),
])
def test_unusable_fits_say_why(items, options, words):
    x = unit(np.random.default_rng(0).standard_normal((items, 512)))
    with pytest.raises(ClapError, match=words):
        fit(x, options)


def test_cli_fits_a_library_file_and_reads_peoples_triplets(model, tmp_path, capsys):
    from clap_ws.search.index import VectorIndex
    from clap_ws.search.library import Library

    x, _ = clusters(unit(np.random.default_rng(6).standard_normal((3, 512))), 10, 0.05)
    items = [{"path": f"s{i}.wav"} for i in range(len(x))]
    Library("lib", {"name": "untrained"}, items, VectorIndex(x, "flat")).save(tmp_path / "lib.npz")
    (tmp_path / "t.jsonl").write_text('{"anchor": "s0.wav", "positive": 25, "negative": "s1.wav"}\n')
    code = cli.main(["projection", "fit", str(tmp_path / "lib.npz"), "--dims", "2", "--epochs", "2", "--triplets",
                     str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "bd.npz")])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["triplets"]["human"] == 1 and set(report["figures"]) == {"fitted", "pca", "random"}
    assert Projection.load(tmp_path / "bd.npz").dims == 2
    (tmp_path / "bad.jsonl").write_text('{"anchor": "s0.wav", "positive": "nope.wav", "negative": 1}\n')
    assert cli.main(["projection", "fit", str(tmp_path / "lib.npz"), "--triplets", str(tmp_path / "bad.jsonl"),
                     "--out", str(tmp_path / "x.npz")]) == 2
    (tmp_path / "junk.jsonl").write_text("not json\n")
    assert cli.main(["projection", "fit", str(tmp_path / "lib.npz"), "--triplets", str(tmp_path / "junk.jsonl"),
                     "--out", str(tmp_path / "x.npz")]) == 2
    assert not (tmp_path / "x.npz").exists()


# ---- online, through a real server ----------------------------------------------------------------
async def wait_for_version(ws, version: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = await ask(ws, {"op": "projection_info"})
        if info["installed"] and info["installed"]["version"] >= version and not info["fitting"]:
            return info
        await asyncio.sleep(0.2)
    raise AssertionError("the fit did not finish")


async def test_an_online_fit_never_holds_up_embeddings_and_installs_a_new_version(model, tmp_path):
    centres = unit(np.random.default_rng(7).standard_normal((5, 512)))
    x, _ = clusters(centres, 80, 0.05)
    async with running_server(model, archives=Archives(tmp_path)) as server:
        async with connect(server) as ws, connect(server, path="/clap-bd") as bd:
            await ask(ws, {"op": "archive_add", "archive": "run", "embeddings": x.tolist(),
                           "ids": [f"g{i}" for i in range(len(x))]})
            before = await ask(bd, noise(seconds=0.5, seed=1).tobytes())
            assert before["behavior_descriptor"] is None and before["projection_version"] is None
            started = await ask(ws, {"op": "projection_fit", "archive": "run", "dims": 4, "epochs": 60})
            assert started["status"] == "OK" and started["next_version"] == 1 and started["items"] == 400
            busy = await ask(ws, {"op": "projection_fit", "archive": "run"})
            assert busy["error"]["code"] == ErrorCode.BUSY
            waits, fitting_seen = [], 0
            for i in range(200):  # bounded: embeds while the fit runs
                t = time.perf_counter()
                reply = await ask(ws, noise(seconds=0.5, seed=100 + i).tobytes())
                waits.append(time.perf_counter() - t)
                assert reply["status"] == "OK"
                info = await ask(ws, {"op": "projection_info"})
                fitting_seen += info["fitting"] is not None
                if info["fitting"] is None:
                    break
            info = await wait_for_version(ws, 1)
            after = await ask(bd, noise(seconds=0.5, seed=1).tobytes())
            flagged = await ask(ws, {"audio_buffer": b64(noise(seconds=0.5, seed=2)),
                                     "descriptor": True})
    assert fitting_seen >= 3 and max(waits) < 2.0  # embeds answered throughout; a fit takes seconds
    assert info["installed"]["version"] == 1 and info["installed"]["fitted_on"]["archive"] == "run"
    assert info["installed"]["figures"]["fitted"]["triplet_agreement"] > 0.8
    assert after["projection_version"] == 1 and len(after["behavior_descriptor"]) == 4
    assert all(0 <= v <= 1 for v in after["behavior_descriptor"]) and flagged["projection_version"] == 1
    assert (tmp_path / "projections" / "current.npz").is_file()  # saved beside the archives
    async with running_server(model, archives=Archives(tmp_path)) as again:  # and reloaded at start
        async with connect(again, path="/clap-bd") as bd:
            reloaded = await ask(bd, noise(seconds=0.5, seed=1).tobytes())
            assert reloaded["projection_version"] == 1
            np.testing.assert_allclose(reloaded["behavior_descriptor"], after["behavior_descriptor"], atol=1e-5)


async def test_bad_online_fits_install_nothing(model):
    x, _ = clusters(unit(np.random.default_rng(8).standard_normal((2, 512))), 20, 0.05)
    async with running_server(model) as server:
        async with connect(server) as ws:
            await ask(ws, {"op": "archive_add", "archive": "small", "embeddings": x[:8].tolist()})
            await ask(ws, {"op": "archive_add", "archive": "run", "embeddings": x.tolist(),
                           "ids": [{"g": i} for i in range(len(x))]})
            few = await ask(ws, {"op": "projection_fit", "archive": "small"})
            unknown = await ask(ws, {"op": "projection_fit", "archive": "run",
                                     "triplets": [{"anchor": {"g": 1}, "positive": {"g": 2}, "negative": {"g": 99}}]})
            dims = await ask(ws, {"op": "projection_fit", "archive": "run", "dims": 99})
            missing = await ask(ws, {"op": "projection_fit", "archive": "nope"})
            info = await ask(ws, {"op": "projection_info"})
    assert few["error"]["code"] == ErrorCode.BAD_REQUEST and "at least 16" in few["error"]["message"]
    assert unknown["error"]["code"] == ErrorCode.BAD_REQUEST and '{"g":99}' in unknown["error"]["message"]
    assert dims["error"]["code"] == ErrorCode.BAD_REQUEST and missing["error"]["code"] == ErrorCode.UNKNOWN_ARCHIVE
    assert info["installed"] is None and info["fitting"] is None and "projection_fit" in info["how"]
