"""ExactScan: the int8 pre-scans must return exactly what a float32 scan returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_ranked
from hypothesis import given, settings
from hypothesis import strategies as st

from clap_ws.model.clap import model_identity
from clap_ws.search.archive import Archives
from clap_ws.search.index import VectorIndex
from clap_ws.search.library import Library
from clap_ws.search.scan import ExactScan, choose_kernel, int8_matmul_available
from clap_ws.service import Service
from clap_ws.similarity import unit
from clap_ws.tolerance import FLOAT32_DOT_TOL


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
    """What a float32 scan returns: scores within float32 rounding of the float64 truth, ids in order up to
    ties within that rounding (``helpers.assert_ranked``); which of two tied items comes first is the BLAS's."""
    keep = np.arange(len(vectors)) if mask is None else np.flatnonzero(mask)
    scores, ids = scan.search(queries, k, mask)
    assert scores.shape == ids.shape == (len(queries), min(k, len(keep)))
    for q, s, i in zip(queries, scores, ids):
        assert_ranked(i, s, dict(zip(keep.tolist(), vectors[keep].astype(np.float64) @ q)), k)


pytestmark = pytest.mark.cpu_class


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
    truth = vectors.astype(np.float64) @ query
    assert np.diff(truth[int8_order]).max() > 2 * FLOAT32_DOT_TOL  # int8 alone inverts more than a tie
    scores, ids = scan.search(query, 10)
    assert_ranked(ids[0], scores[0], dict(enumerate(truth)), 10)


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
