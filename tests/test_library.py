"""Libraries: real audio files, real FAISS indexes, builds killed with SIGKILL, searches over a real server."""

import os
import signal
import subprocess
import sys
import time

import faiss
import numpy as np
import pytest
import soundfile as sf
from helpers import (
    ROOT,
    ask,
    assert_ranked,
    assert_same_embeddings,
    b64,
    connect,
    cosine,
    noise,
    running_server,
    score_tolerance,
    tone,
    write_sounds,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from clap_ws.build import build, scan
from clap_ws.errors import ErrorCode, ModelError
from clap_ws.extractor import CLAPExtractor
from clap_ws.search.index import VectorIndex
from clap_ws.search.library import Filters, Library
from clap_ws.similarity import unit


@pytest.mark.cpu_class
def test_build_reads_every_format_and_lists_what_it_skipped(model, folder, tmp_path):
    report = build(model, folder, tmp_path / "lib.npz", batch=4, progress=False)
    assert (report.embedded, report.reused, report.dropped) == (9, 0, 0)
    assert sorted(p for p, _ in report.skipped) == ["broken.wav", "silent-empty.wav", "zero-bytes.wav"]
    reasons = dict(report.skipped)
    assert "unreadable" in reasons["broken.wav"] and "empty" in reasons["silent-empty.wav"]
    assert reasons["zero-bytes.wav"] == "empty: the file has no bytes"  # not libsndfile's "Format not recognised"
    lib = Library.load(tmp_path / "lib.npz")
    by_path = {item["path"]: item for item in lib.items}
    assert set(by_path) == {"drums/kicks/kick0.wav", "drums/kicks/kick1.wav", "drums/kicks/kick2.wav",
                            "pads/pad0.flac", "pads/pad1.flac", "pads/pad2.flac", "pads/wide.ogg",
                            "noise.mp3", "bell.aiff"}
    kick = by_path["drums/kicks/kick0.wav"]
    assert kick["tags"] == ["drums", "kicks"] and kick["sample_rate"] == 22050 and kick["channels"] == 1
    assert kick["duration"] == pytest.approx(1.0) and len(kick["sha256"]) == 64
    assert by_path["pads/wide.ogg"]["channels"] == 2 and by_path["bell.aiff"]["tags"] == []
    assert lib.model["name"] == "untrained" and lib.index.kind == "flat"
    assert not (tmp_path / "lib.npz.journal").exists()
    # each embedding is the file's own, as the Python API computes it
    data, sr = sf.read(folder / "drums" / "kicks" / "kick1.wav", dtype="float32")
    expected = CLAPExtractor(model=model).extract_embedding(data, sample_rate=sr)
    row = [i for i, item in enumerate(lib.items) if item["path"] == "drums/kicks/kick1.wav"][0]
    assert_same_embeddings(lib.embeddings[row], expected, model.precision)  # a batch of 4 against one alone


def test_incremental_build_embeds_only_what_changed(model, tmp_path):
    root = tmp_path / "sounds"
    root.mkdir()
    write_sounds(root)
    out = tmp_path / "lib.npz"
    build(model, root, out, batch=4, progress=False)
    before = Library.load(out)
    sf.write(root / "pads" / "new.wav", tone(880, sr=16000, seconds=1), 16000)  # new
    sf.write(root / "pads" / "pad1.flac", noise(sr=22050, seconds=1, seed=7), 22050)  # changed
    (root / "noise.mp3").unlink()  # deleted
    os.utime(root / "bell.aiff", ns=(1, 1))  # touched only: same content, new mtime
    report = build(model, root, out, batch=4, progress=False)
    assert (report.embedded, report.dropped, report.reused, report.total) == (2, 1, 7, 9)
    after = Library.load(out)
    paths = [item["path"] for item in after.items]
    assert "pads/new.wav" in paths and "noise.mp3" not in paths and len(set(paths)) == len(paths)
    old = {item["path"]: vec for item, vec in zip(before.items, before.embeddings)}
    new = {item["path"]: vec for item, vec in zip(after.items, after.embeddings)}
    assert np.array_equal(old["drums/kicks/kick0.wav"], new["drums/kicks/kick0.wav"])
    assert cosine(old["pads/pad1.flac"], new["pads/pad1.flac"]) < 0.9999
    report = build(model, root, out, batch=4, progress=False)  # nothing changed: nothing embedded
    assert (report.embedded, report.reused) == (0, 9)


@pytest.mark.cpu_class
@pytest.mark.slow
def test_build_killed_with_sigkill_resumes_without_loss_or_duplicates(model, tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(36):
        sf.write(root / f"s{i:02d}.wav", noise(sr=16000, seconds=0.5, seed=i), 16000)
    out = tmp_path / "lib.npz"
    journal = tmp_path / "lib.npz.journal"
    cmd = [sys.executable, "-m", "clap_ws", "--log-level", "WARNING", "library", "build", str(root), "--out",
           str(out), "--untrained", "--batch", "2", "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len(list(journal.glob("chunk-*.npz"))) < 3:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()  # nothing half-written where a library should be
    done_before = len(list(journal.glob("chunk-*.npz"))) * 2
    assert 6 <= done_before < 36
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    summary = result.stdout
    resumed = int(summary.split("resumed ")[1].split(",")[0])
    embedded = int(summary.split("embedded ")[1].split(",")[0])
    assert resumed == done_before and resumed + embedded == 36
    lib = Library.load(out)
    paths = [item["path"] for item in lib.items]
    assert sorted(paths) == [f"s{i:02d}.wav" for i in range(36)]  # none lost, none twice
    clean = tmp_path / "clean.npz"
    build(model, root, clean, batch=8, progress=False)
    assert_same_embeddings(Library.load(clean).embeddings, lib.embeddings, model.precision)  # other batches


def test_library_from_another_model_is_refused(model, library_file, tmp_path):
    lib = Library.load(library_file)
    lib.model = {**lib.model, "seed": 123}
    lib.save(tmp_path / "other.npz")
    other = Library.load(tmp_path / "other.npz")
    with pytest.raises(ModelError, match="was built with untrained .*seed 123.* but this server runs untrained"):
        other.check_model({"name": "untrained", "sha256": None, "seed": 0, "architecture": "HTSAT-tiny"})
    from clap_ws.server import ClapServer

    with pytest.raises(ModelError, match="cannot be compared"):
        ClapServer(model, libraries=[other])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), k=st.integers(1, 30), queries=st.integers(1, 3), keep=st.floats(0, 1),
       seed=st.integers(0, 2**16))
@pytest.mark.cpu_class
def test_flat_search_is_exact_with_and_without_a_filter(n, k, queries, keep, seed):
    rng = np.random.default_rng(seed)
    vectors, q = unit(rng.standard_normal((n, 512))), unit(rng.standard_normal((queries, 512)))
    index = VectorIndex(vectors[: n // 2], "flat")
    index.add(vectors[n // 2 :])  # grown like an archive
    mask = rng.random(n) < keep
    for m in (None, mask):
        candidates = np.arange(n) if m is None else np.flatnonzero(m)
        scores, ids = index.search(q, k, m)
        assert scores.shape == ids.shape == (queries, min(k, len(candidates)))
        for row, (s, i) in enumerate(zip(scores, ids)):
            expected = np.sort(q[row] @ vectors[candidates].T)[::-1][: len(s)]
            np.testing.assert_allclose(s, expected, atol=1e-5)
            np.testing.assert_allclose(s, vectors[i] @ q[row], atol=1e-5)  # ids match their scores
            assert set(i) <= set(candidates)


def test_flat_library_file_keeps_a_faiss_flat_index(tmp_path):
    vectors = unit(np.random.default_rng(2).standard_normal((500, 512)))
    model = {"name": "untrained", "sha256": None, "seed": 0, "architecture": "HTSAT-tiny"}
    Library("f", model, [{"path": f"{i}.wav", "tags": []} for i in range(500)],
            VectorIndex(vectors, "flat")).save(tmp_path / "f.npz")
    stored = faiss.deserialize_index(np.load(tmp_path / "f.npz")["index"])  # what earlier versions read
    assert stored.ntotal == 500 and isinstance(stored, faiss.IndexFlatIP)
    lib = Library.load(tmp_path / "f.npz")
    assert lib.index.kind == "flat" and lib.index.index is None  # searched by a scan, not a second copy
    assert lib.search(vectors[42], 1)[0][0]["path"] == "42.wav"


@pytest.mark.slow
def test_hnsw_recall_at_10_on_a_synthetic_100k_library():
    """Embeddings with a low intrinsic dimension, as CLAP's are; queries near, not on, items."""
    rng = np.random.default_rng(0)
    latent, n = 24, 100_000
    basis = rng.standard_normal((latent, 512)).astype("f4")
    z = rng.standard_normal((n, latent)).astype("f4")
    vectors = unit(z @ basis + 0.15 * np.sqrt(latent) * rng.standard_normal((n, 512)).astype("f4"))
    picks = rng.integers(0, n, 200)
    queries = unit((z[picks] + 0.3 * rng.standard_normal((200, latent)).astype("f4")) @ basis)
    exact = VectorIndex(vectors, "flat").search(queries, 10)[1]
    approx = VectorIndex(vectors, "hnsw").search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall >= 0.95, recall


def test_hnsw_library_round_trip_and_filtered_search(tmp_path):
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((3000, 512)))
    items = [{"path": f"x{i}.wav", "tags": ["even" if i % 2 == 0 else "odd"]} for i in range(3000)]
    model = {"name": "untrained", "sha256": None, "seed": 0, "architecture": "HTSAT-tiny"}
    Library("syn", model, items, VectorIndex(vectors, "hnsw")).save(tmp_path / "syn.npz")
    lib = Library.load(tmp_path / "syn.npz")
    assert lib.index.kind == "hnsw" and len(lib) == 3000
    (top,) = lib.search(vectors[7], 5)
    assert top[0]["path"] == "x7.wav" and top[0]["score"] == pytest.approx(1, abs=1e-5)
    (only_even,) = lib.search(vectors[7], 5, Filters(("even",)))
    assert len(only_even) == 5 and all(m["tags"] == ["even"] for m in only_even)
    assert only_even[0]["score"] == pytest.approx(max(vectors[::2] @ vectors[7]), abs=1e-5)


# ---- over the wire -----------------------------------------------------------------------------
@pytest.fixture
async def lib_server(model, library_file):
    async with running_server(model, libraries=[Library.load(library_file)]) as server:
        yield server


async def test_search_by_embedding_audio_text_and_hybrid(lib_server, folder, library_file):
    lib = Library.load(library_file)
    row = [i for i, it in enumerate(lib.items) if it["path"] == "pads/pad2.flac"][0]
    data, sr = sf.read(folder / "pads" / "pad2.flac", dtype="float32")
    async with connect(lib_server) as ws:
        by_vec = await ask(ws, {"op": "search", "embedding": lib.embeddings[row].tolist(), "top_k": 3, "id": 1})
        by_audio = await ask(ws, {"op": "search", "audio_buffer": b64(data), "sample_rate": sr, "top_k": 3})
        by_text = await ask(ws, {"op": "search", "text": "a soft pad", "top_k": 9})
        only_text = await ask(ws, {"op": "search", "text": "a soft pad", "audio_buffer": b64(data),
                                   "sample_rate": sr, "alpha": 1.0, "top_k": 9})
        only_audio = await ask(ws, {"op": "search", "text": "a soft pad", "audio_buffer": b64(data),
                                    "sample_rate": sr, "alpha": 0.0, "top_k": 9})
        hybrid = await ask(ws, {"op": "search", "text": "a soft pad", "audio_buffer": b64(data),
                                "sample_rate": sr, "alpha": 0.3, "top_k": 9})
        text_vec = (await ask(ws, {"op": "embed_text", "texts": ["a soft pad"]}))["embeddings"][0]
    assert by_vec["status"] == "OK" and by_vec["id"] == 1 and by_vec["op"] == "search"
    assert by_vec["matches"][0]["path"] == "pads/pad2.flac"
    assert by_vec["matches"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert set(by_vec["matches"][0]) == {"id", "path", "score", "tags", "library", "duration", "sample_rate",
                                         "channels"}
    assert by_vec["matches"][0]["id"] == row and by_vec["matches"][0]["sample_rate"] == 22050
    assert by_vec["matches"][0]["tags"] == ["pads"] and by_vec["matches"][0]["library"] == "sounds"
    assert by_audio["matches"][0]["path"] == "pads/pad2.flac"
    assert [m["path"] for m in only_text["matches"]] == [m["path"] for m in by_text["matches"]]
    assert [m["path"] for m in only_audio["matches"]][:1] == ["pads/pad2.flac"]
    # the server embedded the sound alone, the library in batches: the same up to the precision's bound
    blend = unit(0.3 * unit(np.array(text_vec)) + 0.7 * unit(lib.embeddings[row]))
    truth = {i: float(v @ blend) for i, v in enumerate(lib.embeddings)}
    assert_ranked([m["id"] for m in hybrid["matches"]], [m["score"] for m in hybrid["matches"]], truth, 9,
                  score_tolerance(lib_server.model.precision))


async def test_tag_filter_and_top_k_on_embed(lib_server):
    async with connect(lib_server) as ws:
        kicks = await ask(ws, {"op": "search", "text": "boom", "tags": ["kicks"], "top_k": 10})
        pads = await ask(ws, {"op": "search", "text": "boom", "tags": ["pads"], "top_k": 2})
        none = await ask(ws, {"op": "search", "text": "boom", "tags": ["pads", "kicks"], "top_k": 2})
        embed = await ask(ws, {"audio_buffer": b64(tone(100, seconds=1)), "top_k": 4, "tags": ["drums"]})
        batch = await ask(ws, {"op": "embed_batch", "audio_buffers": [b64(tone(seconds=1)), b64(noise(seconds=1))],
                               "top_k": 2})
    assert sorted(m["path"] for m in kicks["matches"]) == [f"drums/kicks/kick{i}.wav" for i in range(3)]
    assert len(pads["matches"]) == 2 and all("pads" in m["tags"] for m in pads["matches"])
    assert none["matches"] == []
    assert len(embed["matches"]) == 3 and all(m["path"].startswith("drums/") for m in embed["matches"])
    assert [len(m) for m in batch["matches"]] == [2, 2]


async def test_library_errors(model, lib_server):
    async with connect(lib_server) as ws:
        unknown = await ask(ws, {"op": "search", "text": "x", "library": "nope"})
        browse = await ask(ws, {"op": "search", "top_k": 3})
        both = await ask(ws, {"op": "search", "embedding": [0.1] * 512, "audio_buffer": b64(tone())})
        short = await ask(ws, {"op": "search", "embedding": [0.1] * 511})
    assert unknown["error"]["code"] == ErrorCode.UNKNOWN_LIBRARY and "sounds" in unknown["error"]["message"]
    assert both["error"]["code"] == short["error"]["code"] == ErrorCode.BAD_REQUEST
    assert [m["score"] for m in browse["matches"]] == [None] * 3 and browse["more"]  # no query: browse in order
    async with running_server(model) as bare:
        async with connect(bare) as ws:
            reply = await ask(ws, {"op": "search", "text": "x"})
            embed = await ask(ws, {"audio_buffer": b64(tone()), "top_k": 3})
    assert reply["error"]["code"] == embed["error"]["code"] == ErrorCode.NO_LIBRARY


def test_scan_is_recursive_and_filters_extensions(folder):
    names = [p.name for p in scan(folder)]
    assert "notes.txt" not in names and "kick0.wav" in names and "bell.aiff" in names and len(names) == 12


def test_nothing_to_embed_loads_no_model_and_renamed_files_are_reused(model, tmp_path):
    root = tmp_path / "sounds"
    write_sounds(root)
    out = tmp_path / "lib.npz"
    build(model, root, out, batch=4, progress=False)
    before = Library.load(out)
    loads = []

    def factory():
        loads.append(1)
        return model

    written = out.stat().st_mtime_ns
    again = build(factory, root, out, batch=4, progress=False)
    assert loads == [] and again.embedded == 0 and again.reused == 9  # nothing new: the model is never loaded
    assert out.stat().st_mtime_ns == written  # and the file, already this library, is not rewritten
    (root / "pads" / "pad1.flac").rename(root / "drums" / "moved.flac")  # renamed: its bytes are known
    moved = build(factory, root, out, batch=4, progress=False)
    assert loads == [] and moved.embedded == 0 and moved.renamed == 1 and moved.dropped == 1
    after = Library.load(out)
    new = next(i for i, it in enumerate(after.items) if it["path"] == "drums/moved.flac")
    old = next(i for i, it in enumerate(before.items) if it["path"] == "pads/pad1.flac")
    assert after.items[new]["tags"] == ["drums"] and after.model == before.model
    np.testing.assert_array_equal(after.embeddings[new], before.embeddings[old])
    sf.write(root / "pads" / "fresh.wav", tone(500, sr=16000, seconds=1), 16000)
    fresh = build(factory, root, out, batch=4, progress=False)
    assert loads == [1] and fresh.embedded == 1  # a new file: now the model is loaded, once


def test_untrained_libraries_say_so_in_library_info(model, tmp_path, capsys):
    import json as _json

    from clap_ws import cli

    root = tmp_path / "s"
    (root / "a").mkdir(parents=True)
    sf.write(root / "a" / "x.wav", tone(sr=16000, seconds=0.5), 16000)
    build(model, root, tmp_path / "lib.npz", progress=False)
    assert cli.main(["library", "info", str(tmp_path / "lib.npz")]) == 0
    assert "untrained model (random weights)" in _json.loads(capsys.readouterr().out)["warning"]
