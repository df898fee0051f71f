"""Sound libraries: build once from a folder, load at start-up, search fast.

A library is **one file** (an uncompressed ``.npz``) holding the float32
embeddings, a JSON block (format version, the identity of the model that
built it, per-item metadata) and the serialised FAISS index. One file means
one atomic ``os.replace`` on save: a crash never leaves a library that fails
to load.

Item metadata: the path relative to the scanned folder, duration, sample
rate, channels, a sha256 of the file's bytes, size and mtime (to skip
re-hashing unchanged files), and the folder names as tags
(``drums/kicks/k1.wav`` is tagged ``drums`` and ``kicks``).

Building one from a folder needs the model, so it lives in :mod:`clap_ws.build`.

A library built with one model is refused by a server running another: the
embeddings would live in a different space.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ModelError
from ..similarity import unit
from .index import VectorIndex
from .storage import read_npz, write_npz

FORMAT = "clap-ws library"
VERSION = 1


def same_model(a: dict, b: dict) -> bool:
    if a.get("sha256") or b.get("sha256"):
        return a.get("sha256") == b.get("sha256")
    keys = ("name", "seed", "architecture")
    return all(a.get(key) == b.get(key) for key in keys)


def _describe_model(m: dict) -> str:
    return f"{m['name']} ({m['architecture']}, " + (f"sha256 {m['sha256'][:12]}…)" if m.get("sha256")
                                                    else f"seed {m.get('seed')})")


@dataclass
class Library:
    """Embeddings, item metadata and an index, as loaded from (or saved to) one file."""

    name: str
    model: dict
    items: list[dict]
    index: VectorIndex
    root: str = ""
    tag_sets: list[frozenset] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tag_sets = [frozenset(item.get("tags", ())) for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def embeddings(self) -> np.ndarray:
        return self.index.vectors

    # ---- files -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> Library:
        path = Path(path)
        try:
            meta, arrays = read_npz(path)
            vectors, index_bytes = arrays["embeddings"], arrays["index"]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"cannot load library {path}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
            raise ModelError(f"{path} is not a clap-ws library (found {found!r})")
        index = VectorIndex.from_bytes(vectors, meta["index"], index_bytes)
        return cls(name or path.name.removesuffix(".npz"), meta["model"], meta["items"], index, meta.get("root", ""))

    def save(self, path: str | os.PathLike) -> None:
        meta = {"format": FORMAT, "version": VERSION, "model": self.model, "root": self.root,
                "index": self.index.kind, "count": len(self), "items": self.items,
                "saved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_npz(Path(path), meta, embeddings=self.embeddings, index=self.index.to_bytes())

    def check_model(self, identity: dict) -> None:
        if not same_model(self.model, identity):
            raise ModelError(
                f"library {self.name!r} was built with {_describe_model(self.model)}, but this server runs "
                f"{_describe_model(identity)}: embeddings from different models cannot be compared. "
                f"Rebuild it with `clap-ws library build` and the same model options."
            )

    # ---- search --------------------------------------------------------------------
    def search(self, queries: np.ndarray, k: int, tags: list[str] | None = None) -> list[list[dict]]:
        """Top-``k`` items per query (unit vectors), optionally only items carrying all ``tags``."""
        mask = None
        if tags:
            wanted = set(tags)
            mask = np.fromiter((wanted <= t for t in self.tag_sets), bool, len(self.tag_sets))
        scores, ids = self.index.search(unit(queries), k, mask)
        return [[{"path": self.items[i]["path"], "score": float(s), "tags": self.items[i].get("tags", []),
                  "library": self.name} for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]
