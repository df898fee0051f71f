"""Atomic one-file storage for arrays plus a JSON block (libraries, archives, journals).

Every file is written to a temporary name in the same folder, flushed to disk
and renamed over the target, so a reader sees the old file or the new one,
never a torn one, even after ``kill -9`` or a power cut. JSON travels inside
the ``.npz`` as UTF-8 bytes, so loading needs no pickle (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def write_npz(path: Path, meta: dict | list | None = None, **arrays: np.ndarray) -> None:
    if meta is not None:
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_npz(path: Path) -> tuple[Any, dict[str, np.ndarray]]:
    """(the JSON block, the arrays) of a file written by :func:`write_npz`; the block is whatever JSON was saved."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = arrays.pop("meta", None)
    return (json.loads(meta.tobytes().decode()) if meta is not None else None), arrays
