"""Exact top-k by inner product: int8 pre-scans bound every score, float32 decides.

Scanning float32 vectors is bound by memory. Stored as int8 with one scale
per vector they take a quarter of the bytes, read by oneDNN's int8 matmul.
Rounding moves a score by at most ``|q| * max|x - x'| + |q - q'| * max|x'|``
(x', q' the rounded vector and query; both maxima are kept as blocks are
packed), so only items whose int8 score comes within that bound of the k-th
best can be in the top k. Those candidates are rescored from the float32
vectors: the result is what a float32 scan returns, not an approximation
(checked against brute force by a hypothesis test).

The bound holds only if the kernel computes the integer dot products
exactly. x86 CPUs without VNNI multiply u8 x s8 pairs and add each pair in 16
bits with saturation, which overflows for full-range query codes exactly when
query and rows point the same way. So the kernel is checked, not assumed
(:func:`choose_kernel`): when the first block is packed it runs on input built
to overflow, with 8-bit query codes and then 7-bit ones (``127 * 127 * 2`` fits
in 16 bits), and the first whose every score lies within the bound is used;
if none does, the scan stays float32. :attr:`ExactScan.prescan` says which.

Embeddings of real sounds do not fill 512 dimensions evenly, so a first pass
reads less: the rows' ``LEAD`` leading principal directions (from the first
block packed), in int8, 1/8 of the bytes. What it leaves out is bounded by
Cauchy-Schwarz, ``|q_rest . x_rest| <= |q_rest| |x_rest|``, with each row's
``|x_rest|`` kept, so an item's score lies within ``int8 bound + |q_rest|
|x_rest|`` of its leading-dimension score. The floor is the k-th best float32
score of the k items that pass ranks first; everything whose upper bound
reaches it is rescored. If that is more than 1/``LEAD_SHARE`` of the items
(data that fills all dimensions, or a query far from the rows' subspace), the
query goes on to the full int8 pre-scan instead. Where the first block's rows
keep a median ``|x_rest|`` over ``LEAD_RESIDUAL``, the first pass is never
built. While the first pass answers under a quarter of the queries that try
it, only 1 query in ``LEAD_PROBE`` tries it, so a workload it cannot answer
pays little for it. :attr:`ExactScan.answered` counts which pass answered each
query, :attr:`ExactScan.lead_misses` the tries that failed.

Rows are packed in blocks once ``BLOCK`` of them are waiting, by the first
search after that (:meth:`ExactScan.pack`): a library loaded at once is one
block, an archive that grows one item at a time pays one packing per
``BLOCK`` additions, never a repack of everything. Rows not yet in a block are
scanned in float32. Below ``BLOCK`` items, or where oneDNN's int8 matmul is
missing (non-x86 builds of torch), every search is the float32 scan. Vectors
live in one growable buffer, so adding is amortised O(1).

Torch work here must not start an OpenMP team beside the model's: the server
calls :func:`single_threaded` on its index thread, and packing waits for the
first search so that it happens there too. The rescoring is in torch as well,
since numpy's BLAS threads and torch's OpenMP threads spin-wait against each
other. Figures: ``docs/search.md``.

Not thread-safe; callers serialise access.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from ..constants import EMBED_DIM
from ..similarity import unit

logger = logging.getLogger(__name__)

DIM = EMBED_DIM
BLOCK = 8192  # rows per int8 block (4 MB): packing is cheap next to the searches it speeds up
LEAD = 64  # leading principal dimensions read by the first pass
LEAD_RESIDUAL = 0.5  # build the first pass only if the first block's median |x_rest| is at most this
LEAD_SHARE = 8  # the first pass answers when at most 1/8 of the packed items stay candidates
LEAD_PROBE = 8  # while it answers under a quarter of the queries that try it, 1 query in 8 tries it
SUBSET_SHARE = 8  # a filter keeping under 1/8 of the items (1/2 unpacked) scans just those, in float32
SLACK = 1e-4  # float32 rounding in the scans and the projection, far below the bounds themselves (about 0.01)


def single_threaded() -> None:
    """Make torch run serially on the calling thread from now on: no OpenMP team of its own.

    The server runs searches on its index thread while the model runs on its
    worker. A second thread with an OpenMP team makes libgomp count more
    threads than cores and stop spinning between parallel regions, which
    slowed every model call for good (``docs/search.md``). Only this thread's
    OpenMP setting changes (``torch.set_num_threads`` would also change
    torch's global default and clear oneDNN's kernel cache, which slowed the
    model just the same).
    """
    torch.get_num_threads()  # torch sets this thread's OpenMP default on first use; let it, then limit
    ThreadpoolController().limit(limits=1, user_api="openmp")


def int8_matmul_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


# The largest query code. A query is sent as two rows of unsigned codes, its positive and its negative part, with
# no zero point: the kernel adds u8 x s8 pairs, and where it adds them in int16 with saturation (x86 without
# VNNI), codes up to 255 overflow (255 * 127 * 2 > 2**15 - 1) and codes up to 127 cannot (127 * 127 * 2 < 2**15).
QUERY_LEVELS = {"int8": 255, "int8-7bit": 127}
KERNELS = ("int8", "int8-7bit", "float32")  # what answers the pre-scans, most precise first


class _Int8Rows:
    """Rows as int8 blocks laid out for oneDNN, one scale per row, and the two maxima that bound their rounding.

    ``levels`` is the largest query code (:data:`QUERY_LEVELS`).
    ``append`` raises RuntimeError on a torch build without int8 kernels for this CPU.
    """

    def __init__(self, levels: int = QUERY_LEVELS["int8"]):
        self.levels = levels
        self.blocks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.error = 0.0  # max |x - x'|
        self.norm = 0.0  # max |x'|

    def append(self, rows: np.ndarray) -> None:
        scales = np.abs(rows).max(axis=1) / np.float32(127)
        scales[scales == 0] = 1
        codes = np.rint(rows / scales[:, None]).astype(np.int8)
        weight = torch.ops.onednn.qlinear_prepack(torch.from_numpy(codes), None)
        rounded = codes * scales[:, None]
        self.error = max(self.error, _longest(rows - rounded))
        self.norm = max(self.norm, _longest(rounded))
        self.blocks.append((weight, torch.from_numpy(scales), torch.zeros(len(rows), dtype=torch.int32)))

    def scores(self, queries: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """``queries @ rows.T`` from the int8 codes, and per query how far any of those scores can be off."""
        step = float(np.abs(queries).max()) / self.levels or 1.0
        codes = np.rint(queries / step)
        bound = (np.linalg.norm(queries, axis=1) * self.error
                 + np.linalg.norm(queries - codes * step, axis=1) * self.norm + SLACK)
        # positive and negative parts as unsigned rows: no zero point, whose compensation slows AVX2 kernels
        halves = torch.from_numpy(np.concatenate([np.maximum(codes, 0), np.maximum(-codes, 0)]).astype(np.uint8))
        parts = torch.cat([torch.ops.onednn.qlinear_pointwise(
            halves, step, 0, weight, scales, zero_points, None, 1.0, 0, torch.float32, "none", [], "")
            for weight, scales, zero_points in self.blocks], dim=1)
        return parts[: len(queries)] - parts[len(queries) :], bound


def choose_kernel() -> str:
    """The most precise pre-scan kernel whose scores stay within the scan's bound on this CPU, checked, not assumed.

    Runs oneDNN's int8 matmul on the input that overflows a 16-bit accumulator
    (rows of the largest codes, queries aligned with them and against them,
    rows scattered around a query) with 8-bit queries, then 7-bit ones, and
    returns the first whose every score lies within its bound of the float32
    score: ``"int8"``, ``"int8-7bit"``, or ``"float32"`` if neither does or the
    build has no int8 kernels. Detecting VNNI from CPU flags would miss
    ``ONEDNN_MAX_CPU_ISA`` and kernels yet to come; this costs about a millisecond.
    """
    if not int8_matmul_available():
        return "float32"
    rows, queries = _adversarial(np.random.default_rng(0))
    exact = queries.astype(np.float64) @ rows.T.astype(np.float64)
    for kernel in KERNELS[:-1]:
        probe = _Int8Rows(QUERY_LEVELS[kernel])
        try:
            probe.append(rows)
            scored = [probe.scores(query[None]) for query in queries]  # one by one: each uses its largest codes
        except RuntimeError:  # no int8 kernel for this CPU
            return "float32"
        excess = max(float((np.abs(approx.numpy()[0] - truth) - bound[0]).max())
                     for (approx, bound), truth in zip(scored, exact))
        if excess <= 0:
            return kernel
        logger.info("exact search: oneDNN's int8 matmul with %s query codes exceeds its bound by %.3g on this CPU",
                    "8-bit" if kernel == "int8" else "7-bit", excess)
    return "float32"


def _adversarial(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows and queries where 16-bit accumulation saturates: every code at its largest, signs aligned."""
    signs = np.where(rng.random(DIM) < 0.5, -1.0, 1.0)
    flat = np.stack([np.ones(DIM), signs, -signs, np.r_[signs[: DIM // 2], -signs[DIM // 2 :]]])
    near = signs + 0.05 * np.sqrt(DIM) * rng.standard_normal((60, DIM))  # scattered around a query, as in a search
    spread = rng.standard_normal((64, DIM))
    rows = np.concatenate([flat, near, spread])
    queries = np.stack([np.ones(DIM), signs, -signs, signs + 0.05 * np.sqrt(DIM) * rng.standard_normal(DIM)])
    return unit(rows), unit(queries)


class _Leading:
    """The rows' projections on ``LEAD`` principal directions, in int8, and each row's norm off them."""

    def __init__(self, basis: np.ndarray, levels: int):
        self.basis = basis  # (LEAD, DIM), orthonormal rows
        self.rows = _Int8Rows(levels)
        self.rest = np.zeros(0, np.float32)  # |x_rest| per packed row

    @classmethod
    def fit(cls, rows: np.ndarray, levels: int) -> _Leading | None:
        """The leading directions of ``rows`` (uncentred: scores see the mean too), or None if they spread out."""
        sample = np.ascontiguousarray(rows[:: max(1, len(rows) // BLOCK)])  # a bulk load: about BLOCK of its rows
        second = torch.from_numpy(sample).double()
        _, directions = torch.linalg.eigh(second.T @ second)  # ascending
        lead = cls(np.ascontiguousarray(directions[:, -LEAD:].flip(1).T.float().numpy()), levels)
        return lead if np.median(lead.split(sample)[1]) <= LEAD_RESIDUAL else None

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's leading coordinates, and the norm of what they leave out."""
        lead = _dot(rows, self.basis)
        rest = np.einsum("ij,ij->i", rows, rows, dtype=np.float64) - np.einsum("ij,ij->i", lead, lead, dtype=np.float64)
        return lead, np.sqrt(np.maximum(rest, 0)).astype(np.float32)

    def append(self, rows: np.ndarray) -> None:
        lead, rest = self.split(rows)
        self.rows.append(lead)
        self.rest = np.concatenate([self.rest, rest])


class ExactScan:
    """Unit vectors searched exactly; ``quantize=False`` keeps the plain float32 scan.

    ``block`` is the number of rows per int8 block (and so the fewest rows the
    pre-scans cover); tests make it small.
    """

    def __init__(self, vectors: np.ndarray | None = None, quantize: bool = True, block: int = BLOCK):
        self.quantize = quantize and int8_matmul_available()
        self.kernel: str | None = None  # chosen by choose_kernel() when the first block is packed
        self.block = block
        self.answered: Counter[str] = Counter()  # queries answered by "lead", "int8" or "float32"
        self._buffer = np.zeros((0, DIM), np.float32)
        self._count = 0
        self._packed = 0
        self._int8 = _Int8Rows()
        self._lead: _Leading | None = None
        self._lead_rate = 1.0  # running share of the queries that tried the first pass that it answered
        self._lead_skipped = 0
        self.lead_misses = 0  # queries that tried the first pass and went on to the full one
        if vectors is not None:
            self.add(vectors)

    def __len__(self) -> int:
        return self._count

    @property
    def vectors(self) -> np.ndarray:
        return self._buffer[: self._count]

    @property
    def packed(self) -> int:
        """How many rows (from the first) the int8 pre-scans cover."""
        return self._packed

    @property
    def prescan(self) -> str:
        """What answers searches of the packed rows: ``"int8"``, ``"int8-7bit"`` (see :func:`choose_kernel`),
        ``"float32"``, or ``"unpacked"`` before a block's worth of rows has been packed."""
        if not self.quantize:
            return "float32"
        return (self.kernel or "unpacked") if self._packed else "unpacked"

    @property
    def lead_dims(self) -> int:
        """How many leading dimensions the first pass reads; 0 where there is none."""
        return LEAD if self._lead is not None else 0

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
        if self.quantize and self._count - self._packed >= self.block:  # a bulk load becomes one block
            self._pack(self._packed, self._count)

    def _pack(self, start: int, stop: int) -> None:
        if self.kernel is None:
            self.kernel = choose_kernel()
            logger.debug("exact search: %s pre-scan", self.kernel)
        if self.kernel == "float32":  # no int8 kernel this CPU runs within the bound: stay exact in float32
            self.quantize = False
            return
        rows = self._buffer[start:stop]
        if start == 0:
            self._int8 = _Int8Rows(QUERY_LEVELS[self.kernel])
        try:
            self._int8.append(rows)
        except RuntimeError:  # a torch build without int8 kernels for this CPU: stay exact in float32
            self.quantize, self.kernel, self._int8, self._lead = False, "float32", _Int8Rows(), None
            return
        if start == 0:
            self._lead = _Leading.fit(rows, QUERY_LEVELS[self.kernel])
        if self._lead is not None:
            self._lead.append(rows)
        self._packed = stop

    def search(self, queries: np.ndarray, k: int, mask: np.ndarray | None = None):
        """(scores, ids) of shape (q, k'), best first; k' = min(k, items the mask keeps)."""
        self.pack()
        queries = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        ids = None if mask is None else np.flatnonzero(mask)
        k = min(k, self._count if ids is None else len(ids))
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if ids is not None and (SUBSET_SHARE if self._packed else 2) * len(ids) < self._count:
            self.answered["float32"] += len(queries)
            return top_k(_dot(queries, self.vectors[ids]), k, ids)
        if not self._packed:
            self.answered["float32"] += len(queries)
            scores = queries @ self.vectors.T
            if mask is not None:
                scores[:, ~np.asarray(mask, bool)] = -np.inf
            return top_k(scores, k, np.arange(self._count))
        return self._prescanned(queries, k, None if mask is None else np.asarray(mask, bool))

    def _prescanned(self, queries: np.ndarray, k: int, keep: np.ndarray | None):
        tail = _dot(queries, self.vectors[self._packed :])  # rows not yet packed, scored exactly
        if keep is not None:
            tail[:, ~keep[self._packed :]] = -np.inf
        found: list[tuple[np.ndarray, np.ndarray] | None] = [
            self._lead_pass(q, t, k, keep) if self._try_lead() else None for q, t in zip(queries, tail)]
        rest = [row for row, answer in enumerate(found) if answer is None]
        if rest:
            for row, answer in zip(rest, self._int8_pass(queries[rest], tail[rest], k, keep)):
                found[row] = answer
        self.answered["lead"] += len(queries) - len(rest)
        self.answered["int8"] += len(rest)
        answers = [answer for answer in found if answer is not None]
        return np.array([s for s, _ in answers]), np.array([i for _, i in answers])

    def _try_lead(self) -> bool:
        """Whether the next query tries the first pass.

        Always while it answers at least a quarter of the queries that try it,
        which is where trying pays (a miss costs less than an answer saves:
        ``docs/search.md``); below that, 1 query in ``LEAD_PROBE``, so that it
        is found again when the queries change.
        """
        if self._lead is None:
            return False
        self._lead_skipped = 0 if self._lead_rate >= 0.25 else self._lead_skipped + 1
        return self._lead_skipped % LEAD_PROBE == 0

    def _lead_pass(self, query: np.ndarray, tail: np.ndarray, k: int, keep: np.ndarray | None):
        """(scores, ids) from the leading dimensions and few rescored items, or None if too many could qualify."""
        answer = self._lead_answer(query, tail, k, keep)
        self._lead_rate += 0.1 * ((answer is not None) - self._lead_rate)  # running share of tries answered
        self.lead_misses += answer is None
        return answer

    def _lead_answer(self, query: np.ndarray, tail: np.ndarray, k: int, keep: np.ndarray | None):
        assert self._lead is not None  # _try_lead said so
        lead, rest = self._lead.split(query[None])
        approx, bound = self._lead.rows.scores(lead)
        approx = approx[0]
        if keep is not None:
            approx[torch.from_numpy(~keep[: self._packed])] = -torch.inf
        first = torch.topk(approx, min(k, self._packed))
        seeds = first.indices.numpy()[first.values.numpy() > -np.inf]
        known = np.concatenate([_dot(query[None], self.vectors[seeds])[0], tail])
        known = known[known > -np.inf]
        if len(known) < k:
            return None
        floor = np.partition(known, len(known) - k)[len(known) - k]  # k-th best of these: at most the k-th of all
        reaches = approx.numpy() + (bound[0] + rest[0] * self._lead.rest) >= floor  # upper bound reaches the floor
        if LEAD_SHARE * np.count_nonzero(reaches) > self._packed:  # counted first: listing 70k items costs more
            return None
        return self._rescored(query, np.flatnonzero(reaches), tail, k)

    def _int8_pass(self, queries: np.ndarray, tail: np.ndarray, k: int, keep: np.ndarray | None):
        """(scores, ids) per query from the full int8 pre-scan and float32 rescoring."""
        approx, bound = self._int8.scores(queries)
        if keep is not None:
            approx[:, torch.from_numpy(~keep[: self._packed])] = -torch.inf
        # k-th best lower bound of a score: every item of the top k scores at least this
        best = torch.topk(approx, min(k, self._packed), dim=1).values.numpy()
        lower = np.concatenate([best - bound[:, None], tail], 1)
        floor = -np.partition(-lower, k - 1, axis=1)[:, k - 1]
        scores = approx.numpy()
        for row, query in enumerate(queries):
            candidates = np.flatnonzero(scores[row] + bound[row] >= floor[row])  # upper bound reaches it
            if 4 * len(candidates) > self._packed:  # near-duplicates everywhere: one float32 scan is cheaper
                candidates = np.flatnonzero(scores[row] > -np.inf)
            yield self._rescored(query, candidates, tail[row], k)

    def _rescored(self, query: np.ndarray, candidates: np.ndarray, tail: np.ndarray, k: int):
        """The k best of the packed ``candidates`` and the unpacked rows, by float32 score."""
        rows = self.vectors[: self._packed] if len(candidates) == self._packed else self.vectors[candidates]
        exact = _dot(query[None], rows)[0]  # all of them: no copy
        ids = np.concatenate([candidates, np.arange(self._packed, self._count)])
        scores, ids = top_k(np.concatenate([exact, tail])[None], k, ids)
        return scores[0], ids[0]


def _longest(rows: np.ndarray) -> float:
    return float(np.sqrt(np.einsum("ij,ij->i", rows, rows).max()))


def _dot(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``queries @ vectors.T`` in torch, not numpy, next to torch's int8 matmul (see the module docstring)."""
    return (torch.from_numpy(np.ascontiguousarray(queries)) @ torch.from_numpy(vectors).T).numpy()


def top_k(scores: np.ndarray, k: int, ids: np.ndarray):
    """The k best columns of each row of ``scores``, best first, as (scores, ids[columns])."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, top, 1)
    order = np.argsort(-part, axis=1)
    return np.take_along_axis(part, order, 1), ids[np.take_along_axis(top, order, 1)]
