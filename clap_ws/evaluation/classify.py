"""Three ways to name an item's class from its CLAP embedding, on the same items and folds.

* **zero-shot**: cosine to each class prompt's text embedding (CLAP as published);
* **prototypes**: cosine to each class's mean embedding, leave-one-out (an
  item never counts in its own class mean, so it cannot recognise itself);
* **linear**: multinomial logistic regression on the embeddings, scored by
  stratified k-fold cross-validation (scikit-learn), so no item is scored by
  a model that saw it.

Each returns an (items, classes) score matrix; :func:`classification` turns
one into accuracy, per-class and macro figures and a confusion matrix.
"""

from __future__ import annotations

import warnings
from functools import partial

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from .metrics import bootstrap, rank


def zero_shot_scores(embeddings: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    return embeddings @ prompts.T


def prototype_scores(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """Cosine to each class mean, the item's own class mean taken without it (classes need 2+ items)."""
    sums = np.zeros((classes, embeddings.shape[1]))
    np.add.at(sums, labels, embeddings)
    counts = np.bincount(labels, minlength=classes)
    means = sums / counts[:, None]
    scores = embeddings @ _unit(means).T
    own = (sums[labels] - embeddings) / (counts[labels] - 1)[:, None]  # leave-one-out
    scores[np.arange(len(labels)), labels] = np.einsum("ij,ij->i", embeddings, _unit(own))
    return scores


def linear_scores(embeddings: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int) -> np.ndarray:
    """Cross-validated class probabilities of a multinomial logistic regression (``folds`` stratified folds)."""
    smallest = int(np.bincount(labels).min())
    splitter = StratifiedKFold(n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed)
    model = LogisticRegression(max_iter=2000, C=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        proba = cross_val_predict(model, embeddings, labels, cv=splitter, method="predict_proba")
    if proba.shape[1] < classes:  # a class absent from every training fold cannot happen with 2+ items, but be exact
        full = np.zeros((len(labels), classes))
        full[:, np.unique(labels)] = proba
        proba = full
    return proba


def accuracy(scores: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """(predicted class, top-1 hit, top-5 hit, reciprocal rank of the true class if within 10, else 0) per item;
    ties broken at random, as everywhere. The last is LAION's zero-shot "mAP@10" (one relevant class)."""
    order = rank(scores, rng)
    position = (order == labels[:, None]).argmax(axis=1) + 1
    return (order[:, 0], (order[:, 0] == labels).astype(float), (order[:, :5] == labels[:, None]).any(axis=1) * 1.0,
            np.where(position <= 10, 1.0 / position, 0.0))


def chance_figures(scores: np.ndarray, labels: np.ndarray, classes: int, rng: np.random.Generator) -> dict:
    """Top-1, top-5 and macro F1 of ``scores`` without intervals (for :func:`~.metrics.chance`)."""
    predicted, top1, top5, rr10 = accuracy(scores, labels, rng)
    f1 = precision_recall_fscore_support(labels, predicted, labels=np.arange(classes), average="macro",
                                         zero_division=0)[2]
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "mAP@10": float(rr10.mean()),
            "macro_f1": float(f1)}


def classification(scores: np.ndarray, labels: np.ndarray, names: list[str], rng: np.random.Generator,
                   draws: int = 1000) -> dict:
    """Top-1/top-5 accuracy, LAION's mAP@10 (mean reciprocal rank of the true class within 10), macro and
    per-class precision, recall and F1 (95 % bootstrap intervals over items), and the row-normalised confusion
    matrix."""
    predicted, top1, top5, rr10 = accuracy(scores, labels, rng)
    classes = np.arange(len(names))

    def macro(idx: np.ndarray, which: int) -> float:
        return float(precision_recall_fscore_support(labels[idx], predicted[idx], labels=classes, average="macro",
                                                     zero_division=0)[which])

    p, r, f, support = precision_recall_fscore_support(labels, predicted, labels=classes, zero_division=0)
    figures = {"top1": {"mean": float(top1.mean()), "ci95": list(bootstrap(top1, rng, draws))},
               "top5": {"mean": float(top5.mean()), "ci95": list(bootstrap(top5, rng, draws))},
               "mAP@10": {"mean": float(rr10.mean()), "ci95": list(bootstrap(rr10, rng, draws))}}
    small = max(100, draws // 5)  # macro figures re-run scikit-learn per draw: fewer draws
    for which, name in enumerate(("precision", "recall", "f1")):
        figures[f"macro_{name}"] = {"mean": macro(np.arange(len(labels)), which),
                                    "ci95": list(bootstrap(top1, rng, small, partial(macro, which=which)))}
    return {
        "figures": figures,
        "per_class": {n: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f[c]),
                          "support": int(support[c])} for c, n in enumerate(names)},
        "confusion": confusion_matrix(labels, predicted, labels=classes, normalize="true").tolist(),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
