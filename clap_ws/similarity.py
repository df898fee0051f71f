"""Similarity math and the prompt-embedding cache.

One cosine function serves the server and the Python API
(:meth:`clap_ws.CLAPExtractor.compute_similarity`), in float64, so the two
agree to rounding. ``probs`` is CLAP's zero-shot classification: a softmax
over prompts of cosine times the model's learnt logit scale.

:class:`EmbeddingCache` is an LRU of embeddings (prompts by text, sounds by content): an evolution loop sends
the same few prompts with every sound, and a cached prompt costs no model
call at all.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Any

import numpy as np


def unit(x) -> np.ndarray:
    """Rows scaled to unit length (float32); zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)).astype(np.float32)


def cosine_matrix(a, b) -> np.ndarray:
    """(n, m) cosine similarities between rows of ``a`` and rows of ``b`` (float64)."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return a @ b.T


def softmax_probs(cosines: np.ndarray, logit_scale: float) -> np.ndarray:
    logits = cosines * logit_scale
    logits = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


class EmbeddingCache:
    """Least-recently-used map from a key (a text, a sound's content hash) to its embedding."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._items: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._items

    def peek(self, key: Hashable):
        """The value for ``key`` or None, neither counted nor refreshed."""
        return self._items.get(key)

    def get(self, key: Hashable):
        """The embedding for ``key`` (counted as a hit or a miss), or None."""
        vec = self._items.get(key)
        if vec is None:
            self.misses += 1
        else:
            self._items.move_to_end(key)
            self.hits += 1
        return vec

    def lookup(self, texts) -> tuple[dict[str, np.ndarray], list[str]]:
        """(cached embeddings by text, distinct texts still to embed)."""
        found, missing = {}, []
        for text in dict.fromkeys(texts):
            vec = self._items.get(text)
            if vec is None:
                missing.append(text)
                self.misses += 1
            else:
                self._items.move_to_end(text)
                found[text] = vec
                self.hits += 1
        return found, missing

    def store(self, keys, values) -> None:
        if self.capacity <= 0:
            return
        for key, value in zip(keys, values):
            self._items[key] = value
            self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
            self.evictions += 1

    def describe(self) -> dict:
        return {"size": len(self), "capacity": self.capacity, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}
