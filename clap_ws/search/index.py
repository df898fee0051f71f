"""Nearest-neighbour search over unit-norm embeddings, shared by libraries and archives.

:class:`VectorIndex` holds float32 vectors and answers top-k by cosine (inner
product of unit vectors). Two kinds, chosen by size or forced:

* ``flat`` - exact search by :class:`~clap_ws.search.scan.ExactScan` (int8
  pre-scans, then float32 for the few items that can make the top k),
  faster than FAISS's ``IndexFlatIP`` or a float32 BLAS scan on one thread
  (``docs/search.md``); the default up to ``HNSW_THRESHOLD`` items. The file
  still gets a FAISS flat index, the format every clap-ws version reads;
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

import faiss
import numpy as np

from .scan import DIM, ExactScan

HNSW_THRESHOLD = 30_000  # above this, exact search of uniformly spread data costs more than HNSW (docs/search.md)
HNSW_M = 32
EF_CONSTRUCTION = 40
EF_SEARCH = 128
KINDS = ("auto", "flat", "hnsw")
_SCAN_LIMIT = 20_000  # filtered subsets up to this size are scanned exactly, in float32


def choose_kind(n: int, kind: str = "auto", threshold: int = HNSW_THRESHOLD) -> str:
    if kind not in KINDS:
        raise ValueError(f"index kind must be one of {KINDS}, not {kind!r}")
    if kind != "auto":
        return kind
    return "hnsw" if n > threshold else "flat"


class VectorIndex:
    """Unit vectors in an :class:`ExactScan`, plus a FAISS HNSW index over them when the kind is ``hnsw``."""

    def __init__(self, vectors: np.ndarray | None = None, kind: str = "flat", index=None):
        self.kind = kind
        self.scan = ExactScan(vectors, quantize=kind == "flat")  # HNSW answers most searches; no int8 copy
        self.index = index  # None for flat
        if kind == "hnsw" and index is None:
            self.index = faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = EF_CONSTRUCTION
            self.index.hnsw.efSearch = EF_SEARCH
            if len(self):
                self.index.add(self.vectors)

    def __len__(self) -> int:
        return len(self.scan)

    @property
    def vectors(self) -> np.ndarray:
        return self.scan.vectors

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, np.float32)
        if self.index is not None:
            self.index.add(vectors)
        self.scan.add(vectors)

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None):
        """(scores, ids) of shape (q, k'), k' = min(k, candidates); ids index the vectors."""
        ids = None if mask is None else np.flatnonzero(mask)
        if self.kind != "hnsw" or min(k, len(self)) < 1 or (ids is not None and len(ids) <= _SCAN_LIMIT):
            return self.scan.search(queries, k, mask)
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if ids is None:
            return self.index.search(queries, min(k, len(self)))
        selector = faiss.IDSelectorBatch(ids)
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(EF_SEARCH, k))  # type: ignore[attr-defined]
        return self.index.search(queries, min(k, len(ids)), params=params)

    # ---- persistence: the index as bytes, for one-file storage -------------------
    def to_bytes(self) -> np.ndarray:
        index = self.index
        if index is None:  # flat: a FAISS flat index, the format every clap-ws version reads
            index = faiss.IndexFlatIP(DIM)
            index.add(self.vectors)
        return faiss.serialize_index(index)

    @classmethod
    def from_bytes(cls, vectors: np.ndarray, kind: str, data: np.ndarray) -> VectorIndex:
        if kind == "flat":  # the stored flat index is not needed to search
            return cls(vectors, kind)
        index = faiss.deserialize_index(np.asarray(data, dtype=np.uint8))
        if kind == "hnsw":
            index.hnsw.efSearch = EF_SEARCH  # type: ignore[attr-defined]
        if index.ntotal != len(vectors):
            raise ValueError(f"index holds {index.ntotal} vectors, the file {len(vectors)}")
        return cls(vectors, kind, index)
