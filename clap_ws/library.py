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

:func:`build` is resumable and incremental:

* after every batch it writes a journal chunk (``LIB.journal/chunk-N.npz``,
  also via temp file + rename), so a run killed at any moment - ``kill -9``
  included - continues where it stopped, with no file lost and none twice;
* a run over a folder with an existing library embeds only new or changed
  files (same size and mtime, or same content hash: reused) and drops items
  whose files are gone.

A library built with one model is refused by a server running another: the
embeddings would live in a different space.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .audio import AudioSpec, prepare, windows
from .checkpoint import sha256_of
from .errors import ClapError, ModelError
from .index import HNSW_THRESHOLD, VectorIndex, choose_kind
from .inference import AudioJob, Inference
from .model import ClapModel
from .similarity import unit
from .storage import read_npz, write_npz

FORMAT = "clap-ws library"
VERSION = 1
EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")
_log = logging.getLogger(__name__)


def model_identity(model: ClapModel) -> dict:
    """What must match between a library and the server's model."""
    ident = model.identity
    return {"name": ident.name, "sha256": ident.sha256, "seed": ident.seed,
            "architecture": model.architecture.describe()}


def same_model(a: dict, b: dict) -> bool:
    if a.get("sha256") or b.get("sha256"):
        return a.get("sha256") == b.get("sha256")
    return (a.get("name"), a.get("seed"), a.get("architecture")) == (b.get("name"), b.get("seed"), b.get("architecture"))


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
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "Library":
        path = Path(path)
        try:
            meta, arrays = read_npz(path)
            vectors, index_bytes = arrays["embeddings"], arrays["index"]
        except (OSError, KeyError, ValueError) as exc:
            raise ModelError(f"cannot load library {path}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ModelError(f"{path} is not a clap-ws library (format {meta.get('format')!r} {meta.get('version')!r})")
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


# ---- building ----------------------------------------------------------------------------
@dataclass
class BuildReport:
    embedded: int = 0
    reused: int = 0
    dropped: int = 0
    resumed: int = 0  # embedded by an earlier, interrupted run
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    total: int = 0


def scan(root: Path) -> list[Path]:
    """Audio files below ``root``, recursively, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def read_audio(path: Path, max_seconds: float) -> tuple[np.ndarray, dict]:
    """Decode a file with libsndfile; returns its 10-s windows and its metadata."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are plain RuntimeError/LibsndfileError
        raise ClapError(f"unreadable: {exc}", code="bad_audio") from None
    if data.size == 0:
        raise ClapError("empty: no samples", code="bad_audio")
    clip = prepare(np.ascontiguousarray(data), AudioSpec(sample_rate=rate, channels=data.shape[1]), max_seconds)
    meta = {"duration": round(len(data) / rate, 6), "sample_rate": int(rate), "channels": int(data.shape[1])}
    return windows(clip), meta


def _journal_dir(out: Path) -> Path:
    return out.with_name(out.name + ".journal")


def _read_journal(journal: Path) -> tuple[list[dict], list[np.ndarray]]:
    items, vectors = [], []
    for chunk in sorted(journal.glob("chunk-*.npz")):
        try:
            meta, arrays = read_npz(chunk)
            items.extend(meta)
            vectors.append(arrays["embeddings"])
        except Exception as exc:  # a chunk is written atomically, so this is outside damage
            _log.warning("ignoring unreadable journal chunk %s: %s", chunk.name, exc)
    return items, vectors


def build(model: ClapModel, root: str | os.PathLike, out: str | os.PathLike, *, batch: int = 16,
          index: str = "auto", hnsw_threshold: int = HNSW_THRESHOLD, max_seconds: float = 600.0,
          progress: bool = True, on_batch: Callable[[int], None] | None = None) -> BuildReport:
    """Embed every audio file below ``root`` into the library file ``out`` (resumable, incremental)."""
    from tqdm import tqdm

    root, out = Path(root).resolve(), Path(out)
    if not root.is_dir():
        raise ModelError(f"{root} is not a folder")
    identity = model_identity(model)
    known: dict[str, tuple[dict, np.ndarray]] = {}
    if out.exists():
        previous = Library.load(out)
        previous.check_model(identity)
        known.update({item["path"]: (item, vec) for item, vec in zip(previous.items, previous.embeddings)})
    journal = _journal_dir(out)
    journal_items, journal_vectors = _read_journal(journal) if journal.is_dir() else ([], [])
    journal_paths = {item["path"] for item in journal_items}
    if journal_items:
        known.update({item["path"]: (item, vec) for item, vec in zip(journal_items, np.concatenate(journal_vectors))})

    report = BuildReport()
    files = scan(root)
    keep: dict[str, tuple[dict, np.ndarray]] = {}
    todo: list[tuple[Path, str, os.stat_result]] = []
    for path in files:
        rel, stat = path.relative_to(root).as_posix(), path.stat()
        old = known.get(rel)
        if old and old[0]["size"] == stat.st_size and old[0]["mtime_ns"] == stat.st_mtime_ns:
            keep[rel] = old
        elif old and old[0]["sha256"] == sha256_of(path):
            keep[rel] = ({**old[0], "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}, old[1])
        else:
            todo.append((path, rel, stat))
    report.resumed = sum(1 for rel in keep if rel in journal_paths)
    report.reused = len(keep) - report.resumed
    report.dropped = sum(1 for rel in known if rel not in {p.relative_to(root).as_posix() for p in files})

    journal.mkdir(exist_ok=True)
    chunk_no = len(list(journal.glob("chunk-*.npz")))
    inference = Inference(model)
    bar = tqdm(total=len(todo), unit="file", desc="embedding", disable=not progress)
    for start in range(0, len(todo), batch):
        jobs, metas = [], []
        for path, rel, stat in todo[start : start + batch]:
            try:
                wins, meta = read_audio(path, max_seconds)
            except ClapError as exc:
                report.skipped.append((rel, exc.message))
                continue
            tags = list(Path(rel).parent.parts)
            metas.append({"path": rel, **meta, "sha256": sha256_of(path), "size": stat.st_size,
                          "mtime_ns": stat.st_mtime_ns, "tags": tags})
            jobs.append(AudioJob([wins]))
        if jobs:
            results = inference(jobs)
            vectors = np.stack([r.embeddings[0] for r in results])
            write_npz(journal / f"chunk-{chunk_no:06d}.npz", metas, embeddings=vectors)
            chunk_no += 1
            for meta, vec in zip(metas, vectors):
                keep[meta["path"]] = (meta, vec)
            report.embedded += len(jobs)
            if on_batch:
                on_batch(report.embedded)
        bar.update(len(todo[start : start + batch]))
    bar.close()

    order = [p.relative_to(root).as_posix() for p in files]
    items = [keep[rel][0] for rel in order if rel in keep]
    vectors = np.stack([keep[rel][1] for rel in order if rel in keep]) if items else np.zeros((0, 512), np.float32)
    kind = choose_kind(len(items), index, hnsw_threshold)
    Library(out.name, identity, items, VectorIndex(vectors, kind), str(root)).save(out)
    for chunk in journal.glob("*"):
        chunk.unlink()
    journal.rmdir()
    report.total = len(items)
    return report
