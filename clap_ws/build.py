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

import io
import logging
import os
from collections.abc import Callable, Iterator
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


def read_audio(source: Path | io.BytesIO, max_seconds: float) -> tuple[np.ndarray, dict]:
    """Decode a file (a path, or its bytes) with libsndfile; returns its 10-s windows and its metadata."""
    import soundfile as sf

    empty = source.getbuffer().nbytes == 0 if isinstance(source, io.BytesIO) else source.stat().st_size == 0
    if empty:  # libsndfile would call it "Format not recognised"
        raise ClapError("empty: the file has no bytes", code=ErrorCode.BAD_AUDIO)
    try:
        data, rate = sf.read(source if isinstance(source, io.BytesIO) else str(source), dtype="float32",
                             always_2d=True)
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


@dataclass(frozen=True)
class FileTask:
    """One file to embed: where it is, and what the plan already knows of it."""

    rel: str
    path: str
    size: int
    mtime_ns: int
    sha256: str


@dataclass
class Embedded:
    """What embedding a batch of files gave: metadata and vectors of those that decoded, and the skipped ones."""

    metas: list[dict]
    vectors: np.ndarray
    skipped: list[tuple[str, str]]
    files: int  # how many files the batch had


def embed_files(tasks: list[FileTask], inference: Callable[[], Inference], max_seconds: float,
                data: list[bytes] | None = None) -> Embedded:
    """Decode, window and embed ``tasks`` (``data``: their bytes, when the caller sent them instead of a shared
    path); ``inference`` is called only if a file decodes, so unreadable ones need no model."""
    jobs, metas, skipped = [], [], []
    for n, task in enumerate(tasks):
        try:
            wins, meta = read_audio(io.BytesIO(data[n]) if data is not None else Path(task.path), max_seconds)
        except ClapError as exc:
            skipped.append((task.rel, exc.message))
            continue
        metas.append({"path": task.rel, **meta, "sha256": task.sha256, "size": task.size,
                      "mtime_ns": task.mtime_ns, "tags": list(Path(task.rel).parent.parts)})
        jobs.append(AudioJob([wins]))
    vectors = np.zeros((0, EMBED_DIM), np.float32)
    if jobs:
        results = inference()(jobs)
        vectors = np.stack([r.embeddings[0] for r in results if isinstance(r, Result)])
    return Embedded(metas, vectors, skipped, len(tasks))


class LocalEmbedder:
    """Embeds batches in this process, loading the model (``model``, or a function that loads it) on first use."""

    def __init__(self, model: ClapModel | Callable[[], ClapModel], max_seconds: float,
                 on_load: Callable[[ClapModel], None] | None = None):
        self._model = model if isinstance(model, ClapModel) else None
        self._factory = None if isinstance(model, ClapModel) else model
        self._inference: Inference | None = None
        self.max_seconds = max_seconds
        self.on_load = on_load

    def model(self) -> ClapModel:
        if self._model is None:
            assert self._factory is not None
            self._model = self._factory()
            if self.on_load:
                self.on_load(self._model)
        return self._model

    def identity(self) -> dict:
        return model_identity(self.model())

    def check(self, library_model: dict) -> None:
        """Nothing to do now: the model is checked against the library when it loads (``on_load``)."""

    def inference(self) -> Inference:
        self._inference = self._inference or Inference(self.model())
        return self._inference

    def run(self, batches: list[list[FileTask]]) -> Iterator[Embedded]:
        for tasks in batches:
            yield embed_files(tasks, self.inference, self.max_seconds)


def build(model: ClapModel | Callable[[], ClapModel], root: str | os.PathLike, out: str | os.PathLike, *,
          batch: int = 16, index: str = "auto", hnsw_threshold: int = HNSW_THRESHOLD, max_seconds: float = 600.0,
          progress: bool = True, on_batch: Callable[[int], None] | None = None, embedder=None) -> BuildReport:
    """Embed every audio file below ``root`` into the library file ``out`` (resumable, incremental).

    ``model`` may be a function that loads it: then it is called only when a
    file needs embedding (or for a new library), so re-running a build with
    nothing new takes seconds; the library keeps the model it was built with.
    A renamed or copied file whose bytes are known reuses its embedding.
    ``embedder`` (default: this process, :class:`LocalEmbedder`) may embed the
    batches elsewhere (:mod:`clap_ws.ray_build`); this function stays the only
    writer of the journal and of ``out``, so a killed build resumes wherever
    the batches ran.
    """
    from tqdm import tqdm

    root, out = Path(root).resolve(), Path(out)
    if not root.is_dir():
        raise ModelError(f"{root} is not a folder")
    previous = Library.load(out) if out.exists() else None

    def loaded(m: ClapModel) -> None:
        if previous is not None:
            previous.check_model(model_identity(m))
        if m.identity.untrained:
            _log.warning('building with the "untrained" model: random weights, so the library\'s search results '
                         "mean nothing (tests and latency work only)")

    embedder = embedder or LocalEmbedder(model, max_seconds, on_load=loaded)
    known: dict[str, tuple[dict, np.ndarray]] = {}
    identity: dict | None = None
    if previous is not None:
        identity = previous.model
        if isinstance(model, ClapModel):
            previous.check_model(model_identity(model))
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
    todo: list[FileTask] = []
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
            todo.append(FileTask(rel, str(path), stat.st_size, stat.st_mtime_ns, digest))
    report.resumed = sum(1 for rel in keep if rel in journal_paths)
    report.reused = len(keep) - report.resumed
    report.dropped = len(set(known) - set(present))  # one set: linear in the library's size

    if identity is None:  # a new library records the model it is built with
        identity = embedder.identity()
    elif todo:
        embedder.check(identity)
    journal.mkdir(exist_ok=True)
    chunk_no = len(list(journal.glob("chunk-*.npz")))
    bar = tqdm(total=len(todo), unit="file", desc="embedding", disable=not progress)
    for done in embedder.run([todo[i : i + batch] for i in range(0, len(todo), batch)]):
        report.skipped.extend(done.skipped)
        if done.metas:
            write_npz(journal / f"chunk-{chunk_no:06d}.npz", done.metas, embeddings=done.vectors)
            chunk_no += 1
            for meta, vec in zip(done.metas, done.vectors):
                keep[meta["path"]] = (meta, vec)
            report.embedded += len(done.metas)
            if on_batch:
                on_batch(report.embedded)
        bar.update(done.files)
    bar.close()

    items = [keep[rel][0] for rel in present if rel in keep]
    kind = choose_kind(len(items), index, hnsw_threshold)
    unchanged = (previous is not None and items == previous.items and kind == previous.index.kind
                 and previous.root == str(root))
    if not unchanged:  # else the file already is this library: keep it (an HNSW index takes minutes to rebuild)
        vectors = (np.stack([keep[rel][1] for rel in present if rel in keep]) if items
                   else np.zeros((0, EMBED_DIM), np.float32))
        Library(out.name, identity, items, VectorIndex(vectors, kind), str(root)).save(out)
    for chunk in journal.glob("*"):
        chunk.unlink()
    journal.rmdir()
    report.total = len(items)
    return report
