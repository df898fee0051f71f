"""Retrieval and classification figures as the field reports them, per query, with intervals and chance.

Ranking rules, one place for all of them:

* a query ranks every candidate by score, highest first; **ties are broken at
  random** with a seeded generator, so a model that scores everything alike
  (an untrained one, say) gets chance figures instead of whatever order the
  library happens to list its files in;
* ``R@k`` is whether a relevant item is in the top k (LAION's and DCASE's
  R@k, which for one relevant item per query is recall); ``P@k`` is the share
  of the top k that is relevant; ``mAP@k`` averages, over queries, the sum of
  precision at each relevant hit in the top k divided by ``min(k, relevant)``;
  ``nDCG@k`` uses binary gains and a log2 discount; ``MRR`` is 1 / the rank of
  the first relevant item over the whole ranking.

Every function returns per-query values, so a mean comes with a bootstrap
95 % interval over queries (:func:`bootstrap`), and :func:`chance` gives the
same figures under random scores (the "chance line").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

K = 10


def rank(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(q, n) scores -> (q, n) candidate indices, best first; ties in random (seeded) order."""
    scores = np.atleast_2d(scores)
    shuffle = rng.random(scores.shape)
    return np.lexsort((shuffle, -scores), axis=-1)


def ranking_metrics(scores: np.ndarray, relevant: np.ndarray, rng: np.random.Generator, k: int = K,
                    cutoffs: tuple[int, ...] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Per-query ``R@c`` (for each cutoff), ``P@k``, ``mAP@k``, ``nDCG@k`` and ``MRR``.

    ``relevant`` is a (q, n) boolean matrix; a query with no relevant item
    gets NaN (callers leave such queries out). Candidates scored ``-inf``
    rank last and never count (an item excluded from its own query).
    """
    relevant = np.asarray(relevant, bool) & np.isfinite(scores)
    order = rank(scores, rng)
    hits = np.take_along_axis(relevant, order, axis=1)
    n_relevant = relevant.sum(axis=1)
    top = hits[:, :k].astype(float)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (precision * top).sum(axis=1) / np.minimum(k, n_relevant)
        discount = 1 / np.log2(np.arange(2, top.shape[1] + 2))
        ideal = np.array([discount[: min(k, r)].sum() for r in n_relevant])
        ndcg = (top * discount).sum(axis=1) / ideal
        first = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, np.inf)
        out = {f"R@{c}": hits[:, :c].any(axis=1).astype(float) for c in cutoffs}
        out.update({f"P@{k}": top.sum(axis=1) / k, f"mAP@{k}": ap, f"nDCG@{k}": ndcg, "MRR": 1 / first})
    none = n_relevant == 0
    for values in out.values():
        values[none] = np.nan
    return out


def caption_metrics(scores: np.ndarray, owner: np.ndarray, rng: np.random.Generator, k: int = K,
                    cutoffs: tuple[int, ...] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Audio -> caption, LAION-CLAP's rules for several captions per clip.

    ``scores`` is (clips, captions); ``owner[j]`` is the clip caption j
    describes. ``R@c``: the best rank among a clip's captions is within c;
    ``mAP@k``: the precision at each of its captions found in the top k,
    summed and divided by its number of captions.
    """
    relevant = owner[None, :] == np.arange(len(scores))[:, None]
    order = rank(scores, rng)
    hits = np.take_along_axis(relevant, order, axis=1)
    top = hits[:, :k].astype(float)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    out = {f"R@{c}": hits[:, :c].any(axis=1).astype(float) for c in cutoffs}
    out[f"mAP@{k}"] = (precision * top).sum(axis=1) / relevant.sum(axis=1)
    return out


def bootstrap(values: np.ndarray, rng: np.random.Generator, draws: int = 1000,
              statistic: Callable[[np.ndarray], float] | None = None) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``values`` (or of ``statistic(indices)``) over resampled queries."""
    values = np.asarray(values, float)
    n = len(values)
    if n == 0:
        return (float("nan"), float("nan"))
    picks = rng.integers(0, n, size=(draws, n))
    if statistic is None:
        means = values[picks].mean(axis=1)
    else:
        means = np.array([statistic(p) for p in picks])
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(per_query: dict[str, np.ndarray], rng: np.random.Generator, draws: int = 1000) -> dict[str, dict]:
    """{metric: {"mean", "ci95": [low, high], "queries"}} over the queries that have a value."""
    out = {}
    for name, values in per_query.items():
        kept = values[~np.isnan(values)]
        out[name] = {"mean": float(kept.mean()) if len(kept) else float("nan"),
                     "ci95": list(bootstrap(kept, rng, draws)), "queries": int(len(kept))}
    return out


def chance(figures: Callable[[np.ndarray], dict[str, float]], shape: tuple[int, int], rng: np.random.Generator,
           draws: int = 200) -> dict[str, dict]:
    """What ``figures`` gives for random scores of ``shape``: the mean and the 95 % range over ``draws``.

    ``figures`` maps a score matrix to metric means, exactly as for the model, so the chance line accounts for
    the class sizes, the exclusions and the cutoffs of this very evaluation.
    """
    runs = [figures(rng.standard_normal(shape)) for _ in range(draws)]
    return {name: {"mean": float(np.mean([r[name] for r in runs])),
                   "range95": [float(v) for v in np.percentile([r[name] for r in runs], [2.5, 97.5])]}
            for name in runs[0]}
