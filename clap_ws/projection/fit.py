"""Fitting behaviour descriptors: PCA, or a small network trained on triplets (QDHF, with CLAP as the judge).

A triplet (anchor, positive, negative) says the positive sounds more like
the anchor than the negative. From CLAP distances: for an anchor, a positive
among its ``neighbours`` nearest items and a negative from farther away.
From people (``human``): taken as given, oversampled, and any CLAP triplet
they contradict is dropped, so people's judgements take precedence.

:func:`fit` holds out a fifth of the anchors, trains on the rest, and
reports on the held-out triplets the share the projection orders as CLAP
does, how many 10-nearest neighbours it keeps, and the same figures for PCA
and for a random projection. Seeded: the same inputs give the same file.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ClapError, ErrorCode
from ..similarity import unit
from .apply import Projection
from .quality import neighbourhood_kept, triplet_agreement

METHODS = ("triplet", "pca")
MIN_ITEMS = 16
MAX_DIMS = 32


@dataclass(frozen=True)
class FitOptions:
    dims: int = 6
    method: str = "triplet"
    hidden: tuple[int, ...] = (64,)  # hidden layer widths; () is a linear map (then a sigmoid)
    neighbours: int = 10
    triplets_per_anchor: int = 8
    epochs: int = 20
    margin: float = 0.2
    human_weight: int = 4  # each human triplet counts this many times
    max_items: int = 20_000  # larger sets are subsampled (seeded) for the fit
    seed: int = 0
    extra: dict = field(default_factory=dict)  # what it was fitted on, for the record


def check(options: FitOptions, items: int) -> None:
    """Raise ``bad_request`` for options or data a fit cannot use, before any work."""
    if options.method not in METHODS:
        raise ClapError(f"method must be one of {METHODS}, not {options.method!r}", code=ErrorCode.BAD_REQUEST)
    if not 1 <= options.dims <= MAX_DIMS:
        raise ClapError(f"dims must be 1-{MAX_DIMS}, not {options.dims}", code=ErrorCode.BAD_REQUEST)
    if any(not 1 <= h <= 4096 for h in options.hidden) or len(options.hidden) > 2:
        raise ClapError("hidden is at most two layer widths of 1-4096", code=ErrorCode.BAD_REQUEST)
    if items < max(MIN_ITEMS, options.dims + 1):
        raise ClapError(f"a fit needs at least {max(MIN_ITEMS, options.dims + 1)} embeddings; there are {items}",
                        code=ErrorCode.BAD_REQUEST)


def mine_triplets(embeddings: np.ndarray, anchors: np.ndarray, per_anchor: int, neighbours: int,
                  rng: np.random.Generator) -> np.ndarray:
    """(t, 3) triplets from CLAP distances: positive among an anchor's nearest, negative from farther away."""
    n = len(embeddings)
    k = min(neighbours, n - 2)
    rows = []
    for start in range(0, len(anchors), 1024):
        block = anchors[start:start + 1024]
        sims = embeddings[block] @ embeddings.T
        sims[np.arange(len(block)), block] = -np.inf
        near = np.argpartition(-sims, k, axis=1)[:, :k]
        for a, close in zip(block, near):
            far = np.setdiff1d(np.arange(n), np.append(close, a), assume_unique=False)
            positives = rng.choice(close, per_anchor)
            negatives = rng.choice(far, per_anchor)
            rows.append(np.stack([np.full(per_anchor, a), positives, negatives], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 3), int)


def without_contradictions(clap: np.ndarray, human: np.ndarray) -> np.ndarray:
    """CLAP triplets minus those a human triplet reverses (same anchor, positive and negative swapped)."""
    if len(human) == 0:
        return clap
    reversed_pairs = {(a, n, p) for a, p, n in human.tolist()}
    keep = [tuple(t) not in reversed_pairs for t in clap.tolist()]
    return clap[np.array(keep, bool)]


def fit_pca(embeddings: np.ndarray, dims: int) -> tuple[dict[str, np.ndarray], Projection]:
    mean = embeddings.mean(axis=0)
    _, _, vt = np.linalg.svd(embeddings - mean, full_matrices=False)
    components = vt[:dims]
    scores = (embeddings - mean) @ components.T
    arrays = {"components": components, "mean": mean, "low": scores.min(axis=0), "high": scores.max(axis=0)}
    return arrays, Projection.from_layers("pca", arrays, {}, "pca")


def fit_network(embeddings: np.ndarray, train: np.ndarray, human: np.ndarray, options: FitOptions
                ) -> dict[str, np.ndarray]:
    import torch
    from threadpoolctl import ThreadpoolController

    torch.get_num_threads()  # torch sets this thread's OpenMP default on first use (see scan.single_threaded)
    # Tiny steps: a thread team costs 10x here, and would slow the model's worker. Only this thread, only for
    # the fit: a caller's own thread (the CLI's, a test's) gets its setting back.
    with ThreadpoolController().limit(limits=1, user_api="openmp"):
        return _train(embeddings, train, human, options)


def _train(embeddings: np.ndarray, train: np.ndarray, human: np.ndarray, options: FitOptions
           ) -> dict[str, np.ndarray]:
    import torch

    torch.manual_seed(options.seed)
    widths = [embeddings.shape[1], *options.hidden, options.dims]
    layers: list[torch.nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        layers.append(torch.nn.ReLU() if i < len(widths) - 2 else torch.nn.Sigmoid())
    net = torch.nn.Sequential(*layers)
    loss_fn = torch.nn.TripletMarginLoss(margin=options.margin)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    x = torch.from_numpy(np.ascontiguousarray(embeddings, np.float32))
    triplets = np.concatenate([train, *([human] * options.human_weight)]) if len(human) else train
    order_rng = np.random.default_rng(options.seed)
    for _ in range(options.epochs):
        for batch in np.array_split(order_rng.permutation(len(triplets)), max(1, len(triplets) // 512)):
            t = torch.from_numpy(triplets[batch])
            out = net(x[t.reshape(-1)]).reshape(len(batch), 3, -1)
            loss = loss_fn(out[:, 0], out[:, 1], out[:, 2])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    arrays = {}
    for i, layer in enumerate(linears):
        arrays[f"w{i}"] = layer.weight.detach().numpy().copy()
        arrays[f"b{i}"] = layer.bias.detach().numpy().copy()
    return arrays


def fit(embeddings: np.ndarray, options: FitOptions = FitOptions(), human: np.ndarray | None = None) -> Projection:
    """Fit a projection of ``embeddings`` (rows) with ``options``; ``human`` triplets index those rows.

    Raises :class:`~clap_ws.errors.ClapError` (``bad_request``) for unusable
    options or too few embeddings.
    """
    check(options, len(embeddings))
    started = time.time()
    rng = np.random.default_rng(options.seed)
    human = np.zeros((0, 3), int) if human is None else np.asarray(human, int).reshape(-1, 3)
    x = unit(np.asarray(embeddings, np.float32))
    if len(x) > options.max_items:  # a seeded subsample, keeping every row a human triplet names
        keep = np.union1d(rng.choice(len(x), options.max_items, replace=False), human.ravel())
        remap = {old: new for new, old in enumerate(keep)}
        x = x[keep]
        human = np.vectorize(remap.__getitem__)(human) if len(human) else human
    anchors = rng.permutation(len(x))
    held = anchors[: max(1, len(x) // 5)]
    train_anchors = anchors[len(held):]
    train = without_contradictions(
        mine_triplets(x, train_anchors, options.triplets_per_anchor, options.neighbours, rng), human)
    test = mine_triplets(x, held, options.triplets_per_anchor, options.neighbours, rng)

    pca_arrays, pca = fit_pca(x, options.dims)
    random = np.random.default_rng(options.seed + 1).standard_normal((options.dims, x.shape[1])).astype(np.float32)
    if options.method == "pca":
        kind, arrays, chosen = "pca", pca_arrays, pca
    else:
        kind, arrays = "mlp", fit_network(x, train, human, options)
        chosen = Projection.from_layers("mlp", arrays, {}, "fit")
    candidates: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "fitted": chosen, "pca": pca, "random": lambda e: e @ random.T}
    figures = {name: {"triplet_agreement": triplet_agreement(p, x, test),
                      "neighbours_kept_at_10": neighbourhood_kept(p, x, 10, rng=np.random.default_rng(options.seed))}
               for name, p in candidates.items()}
    if len(human):
        figures["fitted"]["human_triplet_agreement"] = triplet_agreement(chosen, x, human)
    meta = {"method": options.method, "dims": options.dims, "hidden": list(options.hidden) if kind == "mlp" else [],
            "items": int(len(x)), "triplets": {"clap_train": int(len(train)), "clap_held_out": int(len(test)),
                                               "human": int(len(human))},
            "figures": figures, "options": {k: v for k, v in asdict(options).items() if k != "extra"},
            "fitted_on": options.extra, "fitted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fit_seconds": round(time.time() - started, 3)}
    return Projection.from_layers(kind, arrays, meta, options.extra.get("source", "fit"))
