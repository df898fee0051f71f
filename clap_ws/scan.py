"""Exact top-k by inner product: an int8 pre-scan bounds every score, float32 decides.

Scanning float32 vectors is bound by memory: 100k x 512 floats are 205 MB,
about 10 ms per query on this project's 2-core machine. Stored as int8 with
one scale per vector they are 51 MB, which oneDNN's int8 matmul (VNNI on x86)
reads in 2.5-3.5 ms on two threads, 4-6 ms on one. Rounding moves a score by
at most ``|q| * max|x - x'| + |q - q'| * max|x'|`` (x', q' the rounded vector
and query; both maxima are kept as blocks are packed), so only items whose
int8 score comes within that bound of the k-th best lower bound can be in the
top k. Those candidates, tens to a few hundred for unit vectors, are rescored
from the float32 vectors: the result is what a float32 scan returns, not an
approximation (checked against brute force by a hypothesis test).

Rows are packed in blocks once ``BLOCK`` of them are waiting, by the first
search after that (:meth:`ExactScan.pack`): a library loaded at once is one
block, an archive that grows one item at a time pays one packing of about
30 ms per ``BLOCK`` additions, never a repack of everything. Rows not yet in a
block are scanned in float32. Below ``BLOCK`` items, or where oneDNN's int8
matmul is missing (non-x86 builds of torch), every search is the float32 scan.
Vectors live in one growable buffer, so adding is amortised O(1) rather than
a copy of the whole archive.

Torch work here must not start an OpenMP team beside the model's: the server
calls :func:`single_threaded` on its index thread, and packing waits for the
first search so that it happens there too. The rescoring is in torch as well:
numpy's BLAS threads and torch's OpenMP threads wait for work by spinning and
slowed each other down (10.6 against 5.7 ms per query when mixed).

Not thread-safe; callers serialise access.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

DIM = 512
BLOCK = 8192  # rows per int8 block: 4 MB, packed in about 30 ms
SUBSET_SHARE = 8  # a filter keeping under 1/8 of the items (1/2 unpacked) scans just those, in float32
SLACK = 1e-4  # float32 rounding in either scan, far below the bound itself (about 0.01)


@dataclass(frozen=True)
class _Block:
    """Rows up to ``stop`` (from the previous block's) as int8 codes laid out for oneDNN, one scale per row."""

    stop: int
    weight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor


def single_threaded() -> None:
    """Make torch run serially on the calling thread from now on: no OpenMP team of its own.

    The server runs searches on its index thread while the model runs on its
    worker. A second thread with an OpenMP team makes libgomp count more
    threads than cores and stop spinning between parallel regions: measured,
    the model went from 73-82 to 102-125 ms per window after int8 searches on
    another thread, and stayed there; with that thread serial, 72-76 ms. Only
    this thread's OpenMP setting changes (``torch.set_num_threads`` would also
    change torch's global default and clear oneDNN's kernel cache, which slowed
    the model just the same).
    """
    torch.get_num_threads()  # torch sets this thread's OpenMP default on first use; let it, then limit
    ThreadpoolController().limit(limits=1, user_api="openmp")


def int8_matmul_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class ExactScan:
    """Unit vectors searched exactly; ``quantize=False`` keeps the plain float32 scan.

    ``block`` is the number of rows per int8 block (and so the fewest rows the
    pre-scan covers); tests make it small.
    """

    def __init__(self, vectors: np.ndarray | None = None, quantize: bool = True, block: int = BLOCK):
        self.quantize = quantize and int8_matmul_available()
        self.block = block
        self._buffer = np.zeros((0, DIM), np.float32)
        self._count = 0
        self._blocks: list[_Block] = []
        self._error = 0.0  # max |x - x'| over packed rows
        self._norm = 0.0  # max |x'| over packed rows
        if vectors is not None:
            self.add(vectors)

    def __len__(self) -> int:
        return self._count

    @property
    def vectors(self) -> np.ndarray:
        return self._buffer[: self._count]

    @property
    def packed(self) -> int:
        """How many rows (from the first) the int8 pre-scan covers."""
        return self._blocks[-1].stop if self._blocks else 0

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.asarray(vectors, np.float32).reshape(-1, DIM)
        need = self._count + len(vectors)
        if need > len(self._buffer):  # the first fill is exact; later growth is geometric
            grown = need if not self._count else max(need, self._count + self._count // 2 + self.block)
            buffer = np.empty((grown, DIM), np.float32)
            buffer[: self._count] = self.vectors
            self._buffer = buffer
        self._buffer[self._count : need] = vectors
        self._count = need

    def pack(self) -> None:
        """Lay out the rows added since the last packing as one int8 block, once a block's worth waits.

        ``search`` calls it first, so packing happens on the thread that
        searches (see :func:`single_threaded`), not on the one that loads.
        """
        if self.quantize and self._count - self.packed >= self.block:  # a bulk load becomes one block
            self._pack(self.packed, self._count)

    def _pack(self, start: int, stop: int) -> None:
        rows = self._buffer[start:stop]
        scales = np.abs(rows).max(axis=1) / np.float32(127)
        scales[scales == 0] = 1
        codes = np.rint(rows / scales[:, None]).astype(np.int8)
        rounded = codes * scales[:, None]
        try:
            weight = torch.ops.onednn.qlinear_prepack(torch.from_numpy(codes), None)
        except RuntimeError:  # a torch build without int8 kernels for this CPU: stay exact in float32
            self.quantize, self._blocks = False, []
            return
        self._error = max(self._error, _longest(rows - rounded))
        self._norm = max(self._norm, _longest(rounded))
        self._blocks.append(_Block(stop, weight, torch.from_numpy(scales),
                                   torch.zeros(stop - start, dtype=torch.int32)))

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None):
        """(scores, ids) of shape (q, k'), best first; k' = min(k, items the mask keeps)."""
        self.pack()
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        ids = None if mask is None else np.flatnonzero(mask)
        k = min(k, self._count if ids is None else len(ids))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if ids is not None and (SUBSET_SHARE if self._blocks else 2) * len(ids) < self._count:
            return top_k(queries @ self.vectors[ids].T, k, ids)
        if not self._blocks:
            scores = queries @ self.vectors.T
            if mask is not None:
                scores[:, ~np.asarray(mask, bool)] = -np.inf
            return top_k(scores, k, np.arange(self._count))
        return self._prescanned(queries, k, mask)

    def _prescanned(self, queries: np.ndarray, k: int, mask: np.ndarray | None):
        packed = self.packed
        step = float(np.abs(queries).max()) / 127 or 1.0
        codes = np.rint(queries / step)
        bound = (np.linalg.norm(queries, axis=1) * self._error
                 + np.linalg.norm(queries - codes * step, axis=1) * self._norm + SLACK)
        u8 = torch.from_numpy((codes + 128).astype(np.uint8))
        approx = torch.cat([torch.ops.onednn.qlinear_pointwise(
            u8, step, 128, b.weight, b.scales, b.zero_points, None, 1.0, 0, torch.float32, "none", [], "")
            for b in self._blocks], dim=1)
        tail = _dot(queries, self.vectors[packed:])  # rows not yet packed, exact
        if mask is not None:
            keep = np.asarray(mask, bool)
            approx[:, torch.from_numpy(~keep[:packed])] = -torch.inf
            tail[:, ~keep[packed:]] = -np.inf
        # k-th best lower bound of a score: every item of the top k scores at least this
        lower = np.concatenate([torch.topk(approx, min(k, packed), dim=1).values.numpy() - bound[:, None], tail], 1)
        floor = -np.partition(-lower, k - 1, axis=1)[:, k - 1]
        approx = approx.numpy()
        tail_ids = np.arange(packed, self._count)
        scores, ids = [], []
        for row, query in enumerate(queries):
            candidates = np.flatnonzero(approx[row] + bound[row] >= floor[row])  # upper bound reaches it
            if 4 * len(candidates) > packed:  # near-duplicates everywhere: one float32 scan is cheaper
                exact, candidates = _dot(query, self.vectors[:packed]), np.arange(packed)
                exact[approx[row] == -np.inf] = -np.inf
            else:
                exact = _dot(query, self.vectors[candidates])
            s, i = top_k(np.concatenate([exact, tail[row]])[None], k, np.concatenate([candidates, tail_ids]))
            scores.append(s[0])
            ids.append(i[0])
        return np.array(scores), np.array(ids)


def _longest(rows: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max()))


def _dot(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``queries @ vectors.T`` in torch, not numpy, next to torch's int8 matmul (see the module docstring)."""
    return (torch.from_numpy(queries) @ torch.from_numpy(vectors).T).numpy()


def top_k(scores: np.ndarray, k: int, ids: np.ndarray):
    """The k best columns of each row of ``scores``, best first, as (scores, ids[columns])."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, top, 1)
    order = np.argsort(-part, axis=1)
    return np.take_along_axis(part, order, 1), ids[np.take_along_axis(top, order, 1)]
