"""Named archives of embeddings, and novelty against them, for evolution runs.

A quality-diversity loop keeps an archive of what it has found and scores a
new sound by how far it is from its k nearest archived neighbours. Here an
archive is a named set of unit embeddings with caller-chosen ids, searched
exactly (a flat :class:`~clap_ws.search.index.VectorIndex`: int8 pre-scans, then
float32 for the candidates, see :mod:`clap_ws.search.scan`; archives grow by a few
hundred items per generation and exact novelty is what the algorithms assume).

Novelty of a query = the mean cosine distance (1 - cosine) to its k nearest
archived items. Asking for more neighbours than the archive holds is an
error (``k_too_large``), not a silently different quantity.

With a directory (``--archive-dir``) archives persist as one ``.npz`` file
each, written atomically; :meth:`Archives.flush` writes those changed since
the last flush (the server calls it every few seconds and at shutdown), and
the directory is read back at start-up so a run survives a restart.

Not thread-safe: the server runs every archive operation on one executor
thread.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import EMBED_DIM
from ..errors import ClapError, ErrorCode
from ..similarity import unit
from .index import VectorIndex
from .storage import read_npz, write_npz

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # used with fullmatch: "$" would let "run\n" through
_log = logging.getLogger(__name__)


class ArchiveError(ClapError):
    code = ErrorCode.ARCHIVE_ERROR


class Archive:
    def __init__(self, name: str, vectors: np.ndarray | None = None, ids: list | None = None,
                 created: float | None = None):
        self.name = name
        self.index = VectorIndex(vectors, "flat")
        self.ids: list[Any] = list(ids or [])
        self.created = created or time.time()
        self.dirty = False

    def __len__(self) -> int:
        return len(self.index)

    def add(self, vectors: np.ndarray, ids: list | None) -> None:
        if ids is not None and len(ids) != len(vectors):
            raise ArchiveError(f"{len(ids)} ids for {len(vectors)} embeddings", code=ErrorCode.BAD_REQUEST)
        start = len(self)
        self.index.add(unit(vectors))
        self.ids.extend(ids if ids is not None else range(start, start + len(vectors)))
        self.dirty = True

    def _check_k(self, k: int) -> None:
        if k > len(self):
            raise ArchiveError(f"k={k} is larger than archive {self.name!r}, which holds {len(self)} items",
                               code=ErrorCode.K_TOO_LARGE)

    def novelty(self, queries: np.ndarray, k: int) -> list[float]:
        self._check_k(k)
        scores, _ = self.index.search(unit(queries), k)
        return (1.0 - scores.astype(np.float64)).mean(axis=1).tolist()

    def search(self, queries: np.ndarray, k: int) -> list[list[dict]]:
        k = min(k, len(self))
        scores, rows = self.index.search(unit(queries), k)
        return [[{"id": self.ids[i], "score": float(s)} for s, i in zip(rs, ri)] for rs, ri in zip(scores, rows)]

    def describe(self) -> dict:
        return {"archive": self.name, "count": len(self), "dimension": EMBED_DIM, "created": self.created}


class Archives:
    """The server's named archives, optionally persisted in a directory."""

    def __init__(self, directory: str | Path | None = None, max_archives: int = 1024):
        self.directory = Path(directory) if directory else None
        self.max_archives = max_archives
        self._archives: dict[str, Archive] = {}
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".*.npz.*.tmp"):  # a write cut short (kill -9): never renamed
                _log.warning("removing the unfinished write %s", stale.name)
                stale.unlink(missing_ok=True)
            for path in sorted(self.directory.glob("*.npz")):
                try:
                    self._archives[path.stem] = self._read(path)
                except Exception as exc:  # one damaged file must not take the good ones with it
                    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
                    path.rename(aside)
                    _log.error("archive file %s cannot be read (%s: %s); moved aside to %s", path.name,
                               type(exc).__name__, exc, aside.name)

    @staticmethod
    def _read(path: Path) -> Archive:
        meta, arrays = read_npz(path)
        if not isinstance(meta, dict) or len(meta.get("ids", ())) != len(arrays["embeddings"]):
            raise ValueError("its ids do not match its embeddings")
        return Archive(path.stem, arrays["embeddings"], meta["ids"], meta.get("created"))

    def sizes(self) -> dict[str, int]:
        """Items per archive (read from another thread: a snapshot of the dict, sizes as they are)."""
        return {name: len(archive) for name, archive in list(self._archives.items())}

    def names(self) -> list[str]:
        return sorted(self._archives)

    def get(self, name: str, create: bool = False) -> Archive:
        if not NAME.fullmatch(name):
            raise ArchiveError(f"archive name {name!r} must be 1-64 letters, digits, '.', '_' or '-'",
                               code=ErrorCode.BAD_REQUEST)
        archive = self._archives.get(name)
        if archive is None:
            if not create:
                raise ArchiveError(f"no archive named {name!r} (known: {', '.join(self.names()) or 'none'})",
                                   code=ErrorCode.UNKNOWN_ARCHIVE)
            if len(self._archives) >= self.max_archives:
                raise ArchiveError(f"this server holds at most {self.max_archives} archives",
                                   code=ErrorCode.TOO_MANY_ITEMS)
            archive = self._archives[name] = Archive(name)
        return archive

    def drop(self, name: str) -> int:
        archive = self.get(name)
        del self._archives[name]
        if self.directory:
            (self.directory / f"{name}.npz").unlink(missing_ok=True)
        return len(archive)

    def flush(self) -> int:
        """Write archives changed since the last flush; returns how many were written.

        One archive that cannot be written (a full disk, say) is logged and
        stays dirty for the next flush; it never stops the others being saved.
        """
        if not self.directory:
            return 0
        written = 0
        for archive in list(self._archives.values()):
            if archive.dirty:
                meta = {"ids": archive.ids, "created": archive.created}
                try:
                    write_npz(self.directory / f"{archive.name}.npz", meta, embeddings=archive.index.vectors)
                except Exception:
                    _log.exception("writing archive %r failed; it is kept in memory and retried", archive.name)
                    continue
                archive.dirty = False
                written += 1
        return written
