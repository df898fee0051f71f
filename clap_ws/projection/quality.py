"""How well a projection keeps what CLAP says is similar: triplet agreement and kept neighbourhoods."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Triplets = np.ndarray  # (t, 3) rows of (anchor, positive, negative) item indices


def triplet_agreement(project: Callable[[np.ndarray], np.ndarray], embeddings: np.ndarray,
                      triplets: Triplets) -> float:
    """Share of triplets whose positive lies closer to the anchor than the negative in the projection."""
    if len(triplets) == 0:
        return float("nan")
    points = project(embeddings)
    a, p, n = (points[triplets[:, j]] for j in range(3))
    return float(np.mean(((a - p) ** 2).sum(axis=1) < ((a - n) ** 2).sum(axis=1)))


def neighbourhood_kept(project: Callable[[np.ndarray], np.ndarray], embeddings: np.ndarray, k: int = 10,
                       sample: int = 2000, rng: np.random.Generator | None = None) -> float:
    """Mean share of each item's ``k`` nearest neighbours (cosine, 512-d) that stay among its ``k`` nearest in the
    projection (Euclidean), over up to ``sample`` items."""
    rng = rng or np.random.default_rng(0)
    rows = rng.choice(len(embeddings), size=min(sample, len(embeddings)), replace=False)
    x = embeddings[rows]
    k = min(k, len(rows) - 1)
    if k < 1:
        return float("nan")
    before = x @ x.T
    np.fill_diagonal(before, -np.inf)
    points = project(x)
    after = -((points[:, None, :] - points[None, :, :]) ** 2).sum(axis=2)
    np.fill_diagonal(after, -np.inf)
    near_before = np.argpartition(-before, k, axis=1)[:, :k]
    near_after = np.argpartition(-after, k, axis=1)[:, :k]
    kept = [len(np.intersect1d(b, a)) / k for b, a in zip(near_before, near_after)]
    return float(np.mean(kept))
