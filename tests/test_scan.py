"""ExactScan: the int8 pre-scans must return exactly what a float32 scan returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT
from hypothesis import given, settings
from hypothesis import strategies as st

from clap_ws import cpu
from clap_ws.model.clap import model_identity
from clap_ws.search.archive import Archives
from clap_ws.search.index import VectorIndex
from clap_ws.search.library import Library
from clap_ws.search.scan import ExactScan, choose_kernel, int8_matmul_available
from clap_ws.service import Service
from clap_ws.similarity import unit


def vectors_like(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Spread-out unit vectors, near a low-dimensional subspace (as embeddings are), or clusters of
    near-duplicates whose int8 order differs from the exact one."""
    if kind == "spread":
        return unit(rng.standard_normal((n, 512)))
    if kind == "subspace":
        return near_subspace(n, int(rng.integers(4, 48)), 1.0, rng)
    centres = unit(rng.standard_normal((max(1, n // 20), 512)))
    return unit(centres[rng.integers(0, len(centres), n)] + 1e-3 * rng.standard_normal((n, 512)))


def near_subspace(n: int, latent: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors near a random ``latent``-dimensional subspace: the low intrinsic dimension of embeddings.

    Before normalising, the subspace part has a standard deviation of sqrt(latent) per dimension and the noise
    off it ``noise``."""
    near = rng.standard_normal((n, latent)) @ rng.standard_normal((latent, 512))
    return unit(near + noise * rng.standard_normal((n, 512)))


def assert_exact(scan: ExactScan, vectors: np.ndarray, queries: np.ndarray, k: int, mask=None) -> None:
    keep = np.arange(len(vectors)) if mask is None else np.flatnonzero(mask)
    scores, ids = scan.search(queries, k, mask)
    assert scores.shape == ids.shape == (len(queries), min(k, len(keep)))
    for q, s, i in zip(queries, scores, ids):
        truth = vectors[keep] @ q
        np.testing.assert_allclose(s, np.sort(truth)[::-1][: len(s)], atol=1e-5)  # the k best scores...
        np.testing.assert_allclose(s, vectors[i] @ q, atol=1e-5)  # ...belong to the ids returned
        assert set(i) <= set(keep) and len(set(i)) == len(i)


def test_int8_matmul_is_available_here():
    assert int8_matmul_available()  # otherwise the tests below only cover the float32 scan
    assert choose_kernel() in ("int8", "int8-7bit")


def test_rows_aligned_with_the_query_stay_within_the_bound():
    """The issue's measurement: 4,096 unit rows drawn around a query, scored by the kernel this CPU was given."""
    rng = np.random.default_rng(0)
    query = unit(rng.standard_normal((1, 512)))
    rows = unit(query + 0.05 * rng.standard_normal((4096, 512)))
    scan = ExactScan(rows, block=4096)
    scan.pack()
    assert scan.prescan == choose_kernel()
    approx, bound = scan._int8.scores(query)
    assert np.all(np.abs(approx.numpy() - rows @ query[0]) <= bound[:, None])
    assert_exact(scan, rows, query, 10)


ISA_SCRIPT = """
import json, numpy as np
from clap_ws import cpu
from clap_ws.model import resolve_precision
from clap_ws.search.scan import QUERY_LEVELS, _Int8Rows, _adversarial, choose_kernel
import torch
rows, queries = _adversarial(np.random.default_rng(0))
errors = {}
for kernel, levels in QUERY_LEVELS.items():
    probe = _Int8Rows(levels)
    probe.append(rows)
    for query in queries:
        approx, bound = probe.scores(query[None])
        excess = float((np.abs(approx.numpy()[0] - rows @ query) - bound[0]).max())
        errors[kernel] = max(errors.get(kernel, -1.0), excess)
print(json.dumps({"kernel": choose_kernel(), "excess": errors, "isa": cpu.instruction_set(),
                  "precision": resolve_precision("auto", torch.device("cpu"))}))
"""


def run_as(isa: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run Python as a CPU whose oneDNN kernels go no further than ``isa`` would (``ONEDNN_MAX_CPU_ISA``)."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": isa}
    return subprocess.run([sys.executable, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_without_vnni_8_bit_queries_overflow_and_7_bit_ones_are_chosen(isa):
    """x86 int8 kernels without VNNI add u8 x s8 pairs in int16 with saturation: 8-bit query codes break
    the bound (so the check can fail), 7-bit ones cannot; and bf16 is emulated there, so ``auto`` is fp32."""
    result = run_as(isa, "-c", ISA_SCRIPT)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["excess"]["int8"] > 0.05  # saturated: far outside the bound
    assert found["excess"]["int8-7bit"] <= 0
    assert found["kernel"] == "int8-7bit"
    assert found["precision"] == "fp32" and "VNNI" not in found["isa"] and "BF16" not in found["isa"]


@pytest.mark.skipif(not {"VNNI", "AMX"} & set(cpu.features()), reason="this CPU has no VNNI")
def test_with_vnni_8_bit_queries_are_exact_enough_and_chosen():
    assert choose_kernel() == "int8"


@pytest.mark.parametrize("isa", ["AVX2", "AVX512_CORE"])
def test_the_exactness_tests_pass_as_a_cpu_without_vnni(isa):
    """The tests of this file, in a process whose oneDNN runs as an AVX2 (or AVX-512 without VNNI) CPU would."""
    result = run_as(isa, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
                    "-k", "not as_a_cpu_without_vnni and not overflow and not server", timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["spread", "clusters", "subspace"]), n=st.integers(1, 700), block=st.integers(16, 300),
       chunks=st.integers(1, 5), k=st.integers(1, 40), queries=st.integers(1, 3), keep=st.floats(0, 1),
       distance=st.sampled_from([0.0, 1e-3, 0.05, None]), seed=st.integers(0, 2**16))
def test_prescan_returns_what_a_float32_scan_returns(kind, n, block, chunks, k, queries, keep, distance, seed):
    """Queries on a stored row, right next to one, near one, or anywhere (None): the nearest-neighbour case,
    where query and rows point the same way, is where a 16-bit int8 accumulator overflows."""
    rng = np.random.default_rng(seed)
    vectors = vectors_like(kind, n, rng)
    near = vectors[rng.integers(0, n, queries)] + (distance or 0) * rng.standard_normal((queries, 512))
    q = unit(near if distance is not None else rng.standard_normal((queries, 512)))
    scan = ExactScan(block=block)
    for part in np.array_split(vectors, chunks):  # grown in pieces, like an archive
        scan.add(part)
    assert scan.packed == 0  # packing waits for a search, on the thread that searches
    np.testing.assert_array_equal(scan.vectors, vectors)
    assert_exact(scan, vectors, q, k)
    assert 0 <= n - scan.packed < block  # whatever waits unpacked is less than a block
    assert_exact(scan, vectors, q, k, rng.random(n) < keep)


def test_an_archive_growing_one_item_at_a_time_is_packed_in_blocks():
    rng = np.random.default_rng(3)
    vectors = vectors_like("clusters", 300, rng)
    scan = ExactScan(block=64)
    for i, v in enumerate(vectors, 1):
        scan.add(v)
        scan.pack()  # what each search does first
        assert scan.packed == i // 64 * 64  # packed once a block is waiting, never repacked
        if i % 50 == 0:
            assert_exact(scan, vectors[:i], unit(vectors[rng.integers(0, i, 2)] + 0.01), 5)


def test_near_duplicates_are_ranked_by_float32_not_by_int8():
    """Items closer together than int8's rounding: the int8 order alone is wrong, the answer is not."""
    rng = np.random.default_rng(4)
    vectors = vectors_like("clusters", 4000, rng)
    query = unit(vectors[7] + 1e-3 * rng.standard_normal(512))
    scan = ExactScan(vectors, block=1024)
    scan.pack()
    assert scan.packed == 4000  # one bulk add, one block
    step = np.abs(vectors).max(1, keepdims=True) / 127
    int8_order = np.argsort(-(np.rint(vectors / step) * step) @ query)[:10]
    exact_order = np.argsort(-(vectors @ query))[:10]
    assert list(int8_order) != list(exact_order)  # so this test can tell the two apart
    assert list(scan.search(query, 10)[1][0]) == list(exact_order)


def test_embeddings_near_a_subspace_are_answered_by_their_leading_dimensions():
    """The first pass reads 64 of 512 rotated dimensions and still returns the float32 answer."""
    rng = np.random.default_rng(6)
    vectors = near_subspace(6000, 24, 0.8, rng)
    scan = ExactScan(vectors[:5000], block=2048)
    scan.pack()
    assert scan.lead_dims == 64 and scan.packed == 5000
    scan.add(vectors[5000:])  # an unpacked tail is scored exactly beside both passes
    near = unit(vectors[rng.integers(0, 6000, 8)] + 0.02 * rng.standard_normal((8, 512)))
    assert_exact(scan, vectors, near, 10)
    assert_exact(scan, vectors, near, 25, rng.random(6000) < 0.6)
    assert scan.answered["lead"] == 16 and scan.answered["int8"] == 0
    away = unit(rng.standard_normal((3, 512)))  # off the subspace: too many candidates, so the full pre-scan
    assert_exact(scan, vectors, away, 10)
    assert scan.answered["int8"] == 3 and scan.lead_misses == 3
    spread = ExactScan(vectors_like("spread", 3000, rng), block=1024)
    spread.pack()
    assert spread.lead_dims == 0  # data filling every dimension gets no first pass


def test_queries_the_first_pass_keeps_missing_mostly_skip_it_until_it_answers_again():
    rng = np.random.default_rng(7)
    vectors = near_subspace(4000, 16, 0.5, rng)
    scan = ExactScan(vectors, block=1024)
    for query in unit(rng.standard_normal((40, 512))):  # one at a time, as the server asks
        assert_exact(scan, vectors, query[None], 10)
    assert scan.answered["int8"] == 40
    assert 10 <= scan.lead_misses <= 20  # tried until it answered under a quarter of its tries, then 1 in 8
    for query in unit(vectors[rng.integers(0, 4000, 16)] + 0.01 * rng.standard_normal((16, 512))):
        assert_exact(scan, vectors, query[None], 10)
    assert scan.answered["lead"] >= 8  # a probe answered, so every query tries it again


def test_a_flat_library_sized_index_is_prescanned_and_exact():
    rng = np.random.default_rng(5)
    vectors = vectors_like("spread", 20_000, rng)
    index = VectorIndex(vectors, "flat")
    queries = unit(rng.standard_normal((4, 512)))
    assert_exact(index.scan, vectors, queries, 10)
    assert index.scan.packed == 20_000
    assert_exact(index.scan, vectors, queries, 10, rng.random(20_000) < 0.5)
    hnsw = VectorIndex(vectors[:3000], "hnsw")
    assert hnsw.scan.packed == 0  # HNSW answers most of its searches: no int8 copy beside it


def test_the_server_searches_on_one_serial_thread_where_loaded_indexes_are_packed(model, tmp_path):
    """A second OpenMP team next to the model's slows every window by a third or more (see scan.single_threaded)."""
    rng = np.random.default_rng(6)
    vectors = vectors_like("spread", 9000, rng)
    library = Library("big", model_identity(model), [{"path": f"{i}.wav", "tags": []} for i in range(9000)],
                      VectorIndex(vectors, "flat"))
    archives = Archives(tmp_path)
    archives.get("run", create=True).add(vectors[:8500], None)
    archives.flush()
    service = Service(model, warm_up=False, libraries=[library], archives=Archives(tmp_path))
    try:
        assert service._pool.submit(torch.get_num_threads).result() == 1
        assert library.index.scan.packed == 9000  # built on that thread, before any search
        assert service.archives.get("run").index.scan.packed == 8500
        assert torch.get_num_threads() > 1  # the rest of the process keeps its threads
    finally:
        service.close()
