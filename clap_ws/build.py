"""``clap-ws library build``: embed every audio file below a folder into one library file.

It is resumable and incremental:

* after every batch it writes a journal chunk (``LIB.journal/chunk-N.npz``,
  also via temp file + rename), so a run killed at any moment - ``kill -9``
  included - continues where it stopped, with no file lost and none twice;
* a run over a folder with an existing library embeds only new or changed
  files (same size and mtime, or same content hash: reused) and drops items
  whose files are gone.

Item metadata: the path relative to the scanned folder, duration, sample
rate, channels, a sha256 of the file's bytes, size and mtime (to skip
re-hashing unchanged files), and the folder names as tags
(``drums/kicks/k1.wav`` is tagged ``drums`` and ``kicks``).

It runs the model through the same :class:`~clap_ws.inference.Inference` as
the server, so a library's embeddings are what a server would answer; the
file format and search live in :mod:`clap_ws.search.library`, which needs no model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import AudioSpec, prepare, windows
from .constants import EMBED_DIM
from .errors import ClapError, ErrorCode, ModelError
from .inference import AudioJob, Inference, Result
from .model.checkpoint import sha256_of
from .model.clap import ClapModel, model_identity
from .search.index import HNSW_THRESHOLD, VectorIndex, choose_kind
from .search.library import Library
from .search.storage import read_npz, write_npz

EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")
_log = logging.getLogger(__name__)


@dataclass
class BuildReport:
    embedded: int = 0
    reused: int = 0
    dropped: int = 0
    resumed: int = 0  # embedded by an earlier, interrupted run
    renamed: int = 0  # new paths whose bytes the library already had (renamed or copied): reused, not embedded
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    total: int = 0


def scan(root: Path) -> list[Path]:
    """Audio files below ``root``, recursively, in a stable order."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file())


def read_audio(path: Path, max_seconds: float) -> tuple[np.ndarray, dict]:
    """Decode a file with libsndfile; returns its 10-s windows and its metadata."""
    import soundfile as sf

    if path.stat().st_size == 0:  # libsndfile would call it "Format not recognised"
        raise ClapError("empty: the file has no bytes", code=ErrorCode.BAD_AUDIO)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile's errors are plain RuntimeError/LibsndfileError
        raise ClapError(f"unreadable: {exc}", code=ErrorCode.BAD_AUDIO) from None
    if data.size == 0:
        raise ClapError("empty: no samples", code=ErrorCode.BAD_AUDIO)
    clip = prepare(np.ascontiguousarray(data), AudioSpec(sample_rate=rate, channels=data.shape[1]), max_seconds)
    meta = {"duration": round(len(data) / rate, 6), "sample_rate": int(rate), "channels": int(data.shape[1])}
    return windows(clip), meta


def _journal_dir(out: Path) -> Path:
    return out.with_name(out.name + ".journal")


def _read_journal(journal: Path) -> tuple[list[dict], list[np.ndarray]]:
    items: list[dict] = []
    vectors: list[np.ndarray] = []
    for chunk in sorted(journal.glob("chunk-*.npz")):
        try:
            meta, arrays = read_npz(chunk)
            if not isinstance(meta, list):
                raise ValueError("its metadata is not a list of items")
            items.extend(meta)
            vectors.append(arrays["embeddings"])
        except Exception as exc:  # a chunk is written atomically, so this is outside damage
            _log.warning("ignoring unreadable journal chunk %s: %s", chunk.name, exc)
    return items, vectors


def build(model: ClapModel | Callable[[], ClapModel], root: str | os.PathLike, out: str | os.PathLike, *,
          batch: int = 16, index: str = "auto", hnsw_threshold: int = HNSW_THRESHOLD, max_seconds: float = 600.0,
          progress: bool = True, on_batch: Callable[[int], None] | None = None) -> BuildReport:
    """Embed every audio file below ``root`` into the library file ``out`` (resumable, incremental).

    ``model`` may be a function that loads it: then it is called only when a
    file needs embedding (or for a new library), so re-running a build with
    nothing new takes seconds; the library keeps the model it was built with.
    A renamed or copied file whose bytes are known reuses its embedding.
    """
    from tqdm import tqdm

    root, out = Path(root).resolve(), Path(out)
    if not root.is_dir():
        raise ModelError(f"{root} is not a folder")
    loaded: list[ClapModel] = [model] if isinstance(model, ClapModel) else []

    def the_model() -> ClapModel:
        if not loaded:
            loaded.append(model())  # type: ignore[operator]
            if out.exists():
                previous.check_model(model_identity(loaded[0]))
        if loaded[0].identity.untrained and not warned:
            warned.append(True)
            _log.warning('building with the "untrained" model: random weights, so the library\'s search results '
                         "mean nothing (tests and latency work only)")
        return loaded[0]

    warned: list[bool] = []
    known: dict[str, tuple[dict, np.ndarray]] = {}
    identity: dict | None = None
    if out.exists():
        previous = Library.load(out)
        identity = previous.model
        if loaded:
            previous.check_model(model_identity(loaded[0]))
        known.update({item["path"]: (item, vec) for item, vec in zip(previous.items, previous.embeddings)})
    journal = _journal_dir(out)
    journal_items, journal_vectors = _read_journal(journal) if journal.is_dir() else ([], [])
    journal_paths = {item["path"] for item in journal_items}
    if journal_items:
        known.update({item["path"]: (item, vec) for item, vec in zip(journal_items, np.concatenate(journal_vectors))})

    report = BuildReport()
    files = scan(root)
    present = [path.relative_to(root).as_posix() for path in files]
    by_hash = {item["sha256"]: (item, vec) for item, vec in known.values()}  # renamed or copied files
    keep: dict[str, tuple[dict, np.ndarray]] = {}
    todo: list[tuple[Path, str, os.stat_result, str]] = []
    for path, rel in zip(files, present):
        stat = path.stat()
        old = known.get(rel)
        if old and old[0]["size"] == stat.st_size and old[0]["mtime_ns"] == stat.st_mtime_ns:
            keep[rel] = old
            continue
        digest = sha256_of(path)  # once per new or changed file: the embedding step reuses it
        same = old if old and old[0]["sha256"] == digest else by_hash.get(digest)
        if same is not None:
            keep[rel] = ({**same[0], "path": rel, "tags": list(Path(rel).parent.parts), "size": stat.st_size,
                          "mtime_ns": stat.st_mtime_ns}, same[1])
            report.renamed += old is None
        else:
            todo.append((path, rel, stat, digest))
    report.resumed = sum(1 for rel in keep if rel in journal_paths)
    report.reused = len(keep) - report.resumed
    report.dropped = len(set(known) - set(present))  # one set: linear in the library's size

    if identity is None:  # a new library records the model it is built with
        identity = model_identity(the_model())
    journal.mkdir(exist_ok=True)
    chunk_no = len(list(journal.glob("chunk-*.npz")))
    inference: Inference | None = None  # the model is loaded once a file decodes (unreadable ones need none)
    bar = tqdm(total=len(todo), unit="file", desc="embedding", disable=not progress)
    for start in range(0, len(todo), batch):
        jobs, metas = [], []
        for path, rel, stat, digest in todo[start : start + batch]:
            try:
                wins, meta = read_audio(path, max_seconds)
            except ClapError as exc:
                report.skipped.append((rel, exc.message))
                continue
            tags = list(Path(rel).parent.parts)
            metas.append({"path": rel, **meta, "sha256": digest, "size": stat.st_size,
                          "mtime_ns": stat.st_mtime_ns, "tags": tags})
            jobs.append(AudioJob([wins]))
        if jobs:
            inference = inference or Inference(the_model())
            results = inference(jobs)
            vectors = np.stack([r.embeddings[0] for r in results if isinstance(r, Result)])
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
    vectors = (np.stack([keep[rel][1] for rel in order if rel in keep]) if items
               else np.zeros((0, EMBED_DIM), np.float32))
    kind = choose_kind(len(items), index, hnsw_threshold)
    Library(out.name, identity, items, VectorIndex(vectors, kind), str(root)).save(out)
    for chunk in journal.glob("*"):
        chunk.unlink()
    journal.rmdir()
    report.total = len(items)
    return report
