"""What ``clap-ws projection fit`` reads: embeddings from a library, an archive file or an ``.npy``, and people's
triplets from JSON lines. Errors name the file and the problem (:class:`~clap_ws.errors.ClapError`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orjson

from ..constants import EMBED_DIM
from ..errors import ClapError, ErrorCode
from ..search.storage import read_npz


def read_source(path: str | Path) -> tuple[np.ndarray, list, list[str]]:
    """(embeddings, item ids, item paths) of a library (ids: item index), an archive (its ids) or an ``.npy``
    (ids: row number; no paths)."""
    path = Path(path)
    if not path.is_file():
        raise ClapError(f"{path} does not exist", code=ErrorCode.BAD_REQUEST)
    if path.suffix == ".npy":
        try:
            vectors = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise ClapError(f"{path} is not a numpy array file: {exc}", code=ErrorCode.BAD_REQUEST) from None
        ids: list = list(range(len(vectors)))
        paths: list[str] = []
    else:
        try:
            meta, arrays = read_npz(path)
            vectors = arrays["embeddings"]
        except (OSError, KeyError, ValueError) as exc:
            raise ClapError(f"{path} is not a clap-ws library or archive: {exc}", code=ErrorCode.BAD_REQUEST) \
                from None
        if isinstance(meta, dict) and "items" in meta:  # a library
            ids, paths = list(range(len(vectors))), [item["path"] for item in meta["items"]]
        else:  # an archive
            ids, paths = list(meta.get("ids", range(len(vectors)))) if isinstance(meta, dict) else [], []
    if vectors.ndim != 2 or vectors.shape[1] != EMBED_DIM:
        raise ClapError(f"{path} holds {vectors.shape} values, not (n, {EMBED_DIM}) embeddings",
                        code=ErrorCode.BAD_REQUEST)
    return vectors.astype(np.float32), ids, paths


def read_triplets(path: str | Path, ids: list, paths: list[str]) -> np.ndarray:
    """(t, 3) row indices from a JSON-lines file of ``{"anchor", "positive", "negative"}`` (ids or paths)."""
    where = {orjson.dumps(item): row for row, item in enumerate(ids)}
    by_path = {p: row for row, p in enumerate(paths)}
    rows = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ClapError(f"cannot read triplets {path}: {exc}", code=ErrorCode.BAD_REQUEST) from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            triplet = json.loads(line)
            names = [triplet[k] for k in ("anchor", "positive", "negative")]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ClapError(f"{path}, line {n}: expected {{\"anchor\", \"positive\", \"negative\"}}",
                            code=ErrorCode.BAD_REQUEST) from None
        row = [by_path.get(x) if isinstance(x, str) and x in by_path else where.get(orjson.dumps(x)) for x in names]
        if None in row:
            missing = names[row.index(None)]
            raise ClapError(f"{path}, line {n}: {missing!r} is not an item of the source", code=ErrorCode.BAD_REQUEST)
        rows.append(row)
    return np.array(rows, int).reshape(-1, 3)
