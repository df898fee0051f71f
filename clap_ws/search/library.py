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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ClapError, ErrorCode, ModelError
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


@dataclass(frozen=True)
class Filters:
    """Which items a search or a browse may return: all ``tags`` (any case), a duration range in seconds."""

    tags: tuple[str, ...] = ()
    min_duration: float | None = None
    max_duration: float | None = None

    @property
    def active(self) -> bool:
        return bool(self.tags) or self.min_duration is not None or self.max_duration is not None


@dataclass
class Library:
    """Embeddings, item metadata and an index, as loaded from (or saved to) one file."""

    name: str
    model: dict
    items: list[dict]
    index: VectorIndex
    root: str = ""
    path: str = ""  # the file it was loaded from, if any
    tag_sets: list[frozenset] = field(init=False, repr=False)
    tag_names: frozenset = field(init=False, repr=False)
    durations: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.tag_sets = [frozenset(t.casefold() for t in item.get("tags", ())) for item in self.items]
        self.tag_names = frozenset().union(*self.tag_sets)
        self.durations = np.array([item.get("duration", np.nan) for item in self.items], dtype=np.float64)

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
        return cls(name or path.name.removesuffix(".npz"), meta["model"], meta["items"], index, meta.get("root", ""),
                   str(path))

    def stamp(self) -> tuple[int, int] | None:
        """(mtime_ns, size) of the file it came from now, or None (no file, or gone): a change means a rebuild."""
        try:
            stat = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size) if stat else None

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

    # ---- search ------------------------------------------------------------------------
    def tags(self) -> dict[str, int]:
        """Each tag (as first spelt) with its item count, most common first."""
        spelling: dict[str, str] = {}
        counts: Counter = Counter()
        for item in self.items:
            for tag in item.get("tags", ()):
                counts[spelling.setdefault(tag.casefold(), tag)] += 1
        return dict(counts.most_common())

    def knows_tag(self, tag: str) -> bool:
        return tag.casefold() in self.tag_names

    def mask(self, filters: Filters | None) -> np.ndarray | None:
        """Items that pass ``filters`` (None: all of them)."""
        if filters is None or not filters.active:
            return None
        keep = np.ones(len(self), bool)
        if filters.tags:
            wanted = {t.casefold() for t in filters.tags}
            keep &= np.fromiter((wanted <= t for t in self.tag_sets), bool, len(self))
        with np.errstate(invalid="ignore"):  # items without a duration pass no duration bound
            if filters.min_duration is not None:
                keep &= self.durations >= filters.min_duration
            if filters.max_duration is not None:
                keep &= self.durations <= filters.max_duration
        return keep

    def result(self, i: int, score: float | None) -> dict[str, Any]:
        """What a search answers about item ``i``."""
        item = self.items[i]
        return {"id": int(i), "library": self.name, "path": item["path"], "score": score,
                "tags": item.get("tags", []), "duration": item.get("duration"),
                "sample_rate": item.get("sample_rate"), "channels": item.get("channels")}

    def search(self, queries: np.ndarray, k: int, filters: Filters | None = None,
               exclude: int | None = None) -> list[list[dict]]:
        """Top-``k`` items per query (unit vectors) among those passing ``filters``, never item ``exclude``."""
        mask = self.mask(filters)
        if exclude is not None:
            mask = np.ones(len(self), bool) if mask is None else mask.copy()
            mask[exclude] = False
        scores, ids = self.index.search(unit(queries), k, mask)
        return [[self.result(i, float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def browse(self, filters: Filters | None, stop: int) -> list[dict]:
        """The first ``stop`` items passing ``filters``, in path order, without scores (search by filters alone)."""
        mask = self.mask(filters)
        ids = range(len(self)) if mask is None else np.flatnonzero(mask)
        return [self.result(i, None) for i in ids[:stop]]

    def item(self, i: int) -> dict:
        """Item ``i``'s metadata; :class:`ClapError` ``not_found`` if there is none."""
        if not 0 <= i < len(self):
            raise ClapError(f"library {self.name!r} has no item {i} (ids are 0-{len(self) - 1})",
                            code=ErrorCode.NOT_FOUND)
        return self.items[i]

    def describe(self) -> dict[str, Any]:
        known = self.durations[np.isfinite(self.durations)]
        return {"name": self.name, "count": len(self), "index": self.index.kind, "root": self.root,
                "prescan": self.index.scan.prescan, "model": self.model.get("name"),
                "architecture": self.model.get("architecture"), "sha256": self.model.get("sha256"),
                "tags": self.tags(),
                "duration": [float(known.min()), float(known.max())] if len(known) else None}


@dataclass(frozen=True)
class Page:
    """Which slice of the ranked results to return, and the lowest score worth returning."""

    top_k: int = 10
    offset: int = 0
    min_score: float | None = None


def find(libraries: list[Library], query: np.ndarray | None, page: Page, filters: Filters | None = None,
         exclude: tuple[str, int] | None = None) -> dict[str, Any]:
    """One page of results across ``libraries``: best score first, or path order when ``query`` is None.

    Returns ``{"count", "offset", "more", "results"}``; ``more`` says a next
    page exists. ``exclude`` is (library name, item id), "more like this"
    leaving out the item itself. Raises :class:`ClapError` ``unknown_tag``
    for a tag no library has, since an empty answer would not say why.
    """
    for tag in filters.tags if filters else ():
        if not any(lib.knows_tag(tag) for lib in libraries):
            raise ClapError(f"no item is tagged {tag!r}; see the library's tags (op libraries)",
                            code=ErrorCode.UNKNOWN_TAG)
    stop = page.offset + page.top_k + 1  # one more than the page: is there a next one?
    rows: list[dict] = []
    for lib in libraries:
        if query is None:
            rows.extend(lib.browse(filters, stop))
        else:
            skip = exclude[1] if exclude is not None and exclude[0] == lib.name else None
            rows.extend(lib.search(query[None], stop, filters, skip)[0])
    if query is not None:
        rows.sort(key=lambda r: -r["score"])
        if page.min_score is not None:
            rows = [r for r in rows if r["score"] >= page.min_score]
    results = rows[page.offset: page.offset + page.top_k]
    return {"count": len(results), "offset": page.offset, "more": len(rows) > page.offset + page.top_k,
            "results": results}
