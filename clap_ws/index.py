"""Nearest-neighbour search over unit-norm embeddings, shared by libraries and archives.

:class:`VectorIndex` holds float32 vectors and answers top-k by cosine (inner
product of unit vectors). Two kinds, chosen by size or forced:

* ``flat`` - exact search: one matrix product in numpy (BLAS), then a
  partial sort; the default up to ``HNSW_THRESHOLD`` items. FAISS's
  ``IndexFlatIP`` scans on one thread for a single query; measured at 100k
  items on 2 cores: 19 ms against numpy's 10 ms, and 41 against 23 ms while
  the model ran on the same cores (the model slowed less, too). So a flat
  index keeps only the vectors; the file still gets a FAISS flat index, the
  format every clap-ws version reads;
* ``hnsw`` - approximate, ``IndexHNSWFlat`` (M=32), above it. ``efSearch``
  128 gives recall@10 >= 0.95 against exact search on a synthetic 100k set
  (tested).

A filter (a boolean mask over items, e.g. from tags) is applied exactly: small
subsets and flat indexes are scanned, large subsets of an HNSW index use
FAISS's search-time ID selector.
The class is not thread-safe; callers serialise access (the server runs all
index work on one executor thread).
"""

from __future__ import annotations

import numpy as np

import faiss

DIM = 512
HNSW_THRESHOLD = 20_000  # a flat search of 100k items takes about 11 ms here, so 20k about 2 ms
HNSW_M = 32
EF_CONSTRUCTION = 40
EF_SEARCH = 128
KINDS = ("auto", "flat", "hnsw")
_SCAN_LIMIT = 20_000  # filtered subsets up to this size are scanned exactly with numpy


def choose_kind(n: int, kind: str = "auto", threshold: int = HNSW_THRESHOLD) -> str:
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, not {kind!r}")
    if kind != "auto":
        return kind
    return "hnsw" if n > threshold else "flat"


class VectorIndex:
    """Unit vectors, plus a FAISS HNSW index over them when the kind is ``hnsw``."""

    def __init__(self, vectors: np.ndarray | None = None, kind: str = "flat", index=None):
        self.kind = kind
        self.vectors = np.zeros((0, DIM), np.float32) if vectors is None else np.ascontiguousarray(vectors, np.float32)
        self.index = index  # None for flat: search scans self.vectors
        if kind == "hnsw" and index is None:
            self.index = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = EF_CONSTRUCTION
            self.index.hnsw.efSearch = EF_SEARCH
            if len(self.vectors):
                self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.vectors)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        if self.index is not None:
            self.index.add(vectors)
        self.vectors = np.concatenate([self.vectors, vectors]) if len(self.vectors) else vectors.copy()

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None):
        """(scores, ids) of shape (q, k'), k' = min(k, candidates); ids index the vectors."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        ids = None if mask is None else np.flatnonzero(mask)
        k = min(k, len(self) if ids is None else len(ids))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if self.kind == "hnsw" and ids is None:
            return self.index.search(queries, k)
        if self.kind == "hnsw" and len(ids) > _SCAN_LIMIT:
            params = faiss.SearchParametersHNSW(sel=faiss.IDSelectorBatch(ids), efSearch=max(EF_SEARCH, k))
            return self.index.search(queries, k, params=params)
        if ids is None or 2 * len(ids) > len(self):  # most items: score all, rule out the rest
            scores = queries @ self.vectors.T
            if ids is not None:
                scores[:, ~np.asarray(mask, bool)] = -np.inf
            return _top_k(scores, k, np.arange(len(self)))
        return _top_k(queries @ self.vectors[ids].T, k, ids)

    # ---- persistence: the index as bytes, for one-file storage -------------------
    def to_bytes(self) -> np.ndarray:
        index = self.index
        if index is None:  # flat: a FAISS flat index, the format every clap-ws version reads
            index = faiss.IndexFlatIP(DIM)
            index.add(self.vectors)
        return faiss.serialize_index(index)

    @classmethod
    def from_bytes(cls, vectors: np.ndarray, kind: str, data: np.ndarray) -> "VectorIndex":
        if kind == "flat":  # the stored flat index is not needed to search
            return cls(vectors, kind)
        index = faiss.deserialize_index(np.asarray(data, dtype=np.uint8))
        if kind == "hnsw":
            index.hnsw.efSearch = EF_SEARCH
        if index.ntotal != len(vectors):
            raise ValueError(f"index holds {index.ntotal} vectors, the file {len(vectors)}")
        return cls(vectors, kind, index)


def _top_k(scores: np.ndarray, k: int, ids: np.ndarray):
    """The k best columns of each row of ``scores``, best first, as (scores, ids[columns])."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, top, 1)
    order = np.argsort(-part, axis=1)
    return np.take_along_axis(part, order, 1), ids[np.take_along_axis(top, order, 1)]
