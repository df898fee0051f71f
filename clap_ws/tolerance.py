"""How close two results must be to count as the same: one policy for tests, engines and docs.

fp32 is batch-invariant on every CPU class tried, so fp32 results are
compared strictly. bf16 is not: on AMX oneDNN picks different kernels for
different batch sizes, and on every CPU a text's padding follows the longest
text of its batch. The bf16 bound is two bf16 roundings (``2**-7``; an 8-bit
significand's unit roundoff is ``2**-8``) of a unit vector's components, and a
cosine a few times below the worst seen (figures and CPUs:
``docs/precision.md``).

Exact search is held to float32 arithmetic, whose summation order is the
BLAS's choice: two scores within :data:`FLOAT32_DOT_TOL` are a tie and may come
in either order.
"""

from __future__ import annotations

import numpy as np

from .constants import EMBED_DIM

FP32_MAX_ABS = 1e-6  # float32 results from the same input: batch-invariant, so only last-bit noise
BF16_MAX_ABS = 2.0**-7  # two bf16 roundings of a component of a unit vector
BF16_MIN_COSINE = 0.9995
# |fl(q.x) - q.x| <= n u sum|q_i x_i| <= n u for unit vectors, whatever the order of summation
FLOAT32_DOT_TOL = EMBED_DIM * 2.0**-24


def bounds(precision: str) -> tuple[float, float]:
    """``(max_abs, min_cosine)`` for two embeddings of the same input computed in ``precision``, possibly in
    different batches. fp16 (GPUs) has a longer significand than bf16, so the bf16 bound covers it."""
    if precision == "fp32":
        return FP32_MAX_ABS, 1 - 1e-9
    return BF16_MAX_ABS, BF16_MIN_COSINE


def engine_min_cosine(precision: str) -> float:
    """The least cosine another engine's embeddings may have to torch's fp32 ones and still serve: in fp32 the
    engines differ only in summation order and kernels (``docs/performance.md``), in bf16 by the bf16 bound."""
    return 0.99999 if precision == "fp32" else BF16_MIN_COSINE


def disagreement(a, b) -> tuple[float, float]:
    """``(max abs difference, min row cosine)`` of two arrays of embeddings of the same shape."""
    a64, b64 = np.atleast_2d(np.asarray(a, np.float64)), np.atleast_2d(np.asarray(b, np.float64))
    if a64.shape != b64.shape:
        raise ValueError(f"shapes differ: {a64.shape} and {b64.shape}")
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    cos = np.sum(a64 * b64, axis=1) / np.where(norms == 0, 1, norms)
    return float(np.abs(a64 - b64).max(initial=0)), float(cos.min(initial=1))


def agree(a, b, precision: str) -> bool:
    """Whether ``a`` and ``b`` are the same embeddings within ``precision``'s bound (:func:`bounds`)."""
    max_abs, min_cos = bounds(precision)
    worst_abs, worst_cos = disagreement(a, b)
    return worst_abs <= max_abs and worst_cos >= min_cos
