"""A behaviour-descriptor projection: 512-d embeddings to a few dimensions, as loaded, saved and applied.

Quality-diversity algorithms (MAP-Elites and kin) place each sound in a
low-dimensional behaviour space. Formats read by :meth:`Projection.load`:

* a projection written by clap-ws (``clap-ws projection fit``, or a
  ``projection_fit`` during a run): an ``.npz`` holding its layers and a JSON
  block (method, what it was fitted on, its quality figures); outputs in [0, 1];
* ``.npz`` with ``components`` (d x 512) and optional ``mean`` (512): PCA,
  ``(x - mean) @ components.T``; with ``weight`` (d x 512) and optional
  ``bias`` (d): linear, ``x @ weight.T + bias``;
* anything else: a TorchScript module (``torch.jit.save``) mapping an (n, 512)
  float32 tensor to (n, d). TorchScript is code: load only files you trust.

The file is read once, only from the path given.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..constants import EMBED_DIM
from ..errors import ModelError
from ..search.storage import read_npz, write_npz

FORMAT = "clap-ws projection"


def _is_npz(path: Path) -> bool:
    """numpy's ``.npz`` is a zip of ``.npy`` files (TorchScript files are zips too, of other things)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return bool(names) and all(name.endswith(".npy") for name in names)


class Projection:
    """Callable: (n, 512) embeddings -> (n, d) float32 descriptors. ``meta`` says how it was made (fitted ones)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], dims: int, source: str, meta: dict | None = None,
                 arrays: dict[str, np.ndarray] | None = None):
        self.fn, self.dims, self.source = fn, dims, source
        self.meta = meta or {}
        self.arrays = arrays or {}  # what save() writes (fitted projections)
        self.outputs = 0  # descriptor values produced, and how many fell outside the fitted range and were clipped
        self.clipped = 0

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        out = np.asarray(self.fn(np.atleast_2d(embeddings).astype(np.float32)), dtype=np.float32)
        if self.meta.get("kind") == "pca":  # scaled to [0, 1] over the fitted data; outside it, clipped and counted
            self.outputs += out.size
            self.clipped += int(np.count_nonzero((out < 0) | (out > 1)))
            out = np.clip(out, 0.0, 1.0)
        return out

    def describe(self) -> dict:
        return {"source": self.source, "dimensions": self.dims,
                **{k: v for k, v in self.meta.items() if k not in ("format", "layers")},
                **({"outputs": self.outputs, "clipped": self.clipped} if self.meta.get("kind") == "pca" else {})}

    # ---- fitted projections: layers as arrays -----------------------------------------------------
    @classmethod
    def from_layers(cls, kind: str, arrays: dict[str, np.ndarray], meta: dict, source: str) -> Projection:
        """``pca``: components, mean, low, high; ``mlp``: w0, b0, w1, b1 ... (ReLU between, sigmoid last)."""
        arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
        if kind == "pca":
            components, mean, low, span = (arrays["components"], arrays["mean"], arrays["low"],
                                           np.maximum(arrays["high"] - arrays["low"], 1e-12))

            def fn(x: np.ndarray) -> np.ndarray:
                return ((x - mean) @ components.T - low) / span

            dims = len(components)
        elif kind == "mlp":
            layers = [(arrays[f"w{i}"], arrays[f"b{i}"]) for i in range(len(arrays) // 2)]

            def fn(x: np.ndarray) -> np.ndarray:
                for n, (w, b) in enumerate(layers):
                    x = x @ w.T + b
                    x = np.maximum(x, 0) if n < len(layers) - 1 else 1 / (1 + np.exp(-x))
                return x

            dims = len(layers[-1][1])
        else:
            raise ModelError(f"unknown projection kind {kind!r}")
        return cls(fn, dims, source, {**meta, "kind": kind}, arrays)

    def save(self, path: str | Path) -> None:
        """Write a fitted projection atomically, in the format :meth:`load` reads."""
        if not self.arrays:
            raise ModelError("only projections made by clap-ws can be saved")
        write_npz(Path(path), {**self.meta, "format": FORMAT}, **self.arrays)

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"projection file {path} does not exist")
        if _is_npz(path):
            return cls._load_npz(path)
        return cls._load_torchscript(path)

    @classmethod
    def _load_npz(cls, path: Path) -> Projection:
        try:
            meta, arrays = read_npz(path)
        except Exception as exc:
            raise ModelError(f"{path.name} cannot be read as a projection: {exc}") from None
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            return cls.from_layers(meta["kind"], arrays, meta, path.name)
        arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
        if "components" in arrays:
            matrix, offset = arrays["components"], arrays.get("mean", np.zeros(EMBED_DIM, np.float32))
            fn = lambda x: (x - offset) @ matrix.T  # noqa: E731
        elif "weight" in arrays:
            matrix, bias = arrays["weight"], arrays.get("bias", np.zeros(len(arrays["weight"]), np.float32))
            fn = lambda x: x @ matrix.T + bias  # noqa: E731
        else:
            raise ModelError(f"{path.name} needs 'components' (PCA) or 'weight' (linear); it has {sorted(arrays)}")
        if matrix.ndim != 2 or matrix.shape[1] != EMBED_DIM:
            raise ModelError(f"{path.name}: the projection matrix must be d x {EMBED_DIM}, not {matrix.shape}")
        return cls(fn, matrix.shape[0], path.name)

    @classmethod
    def _load_torchscript(cls, path: Path) -> Projection:
        import torch

        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            raise ModelError(f"{path.name} is neither a .npz projection nor a TorchScript module: {exc}") from None

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).float().numpy()

        try:
            dims = run(np.zeros((1, EMBED_DIM), np.float32)).shape[1]
        except Exception as exc:
            raise ModelError(f"{path.name} does not map (n, {EMBED_DIM}) to (n, d): {exc}") from None
        return cls(run, dims, path.name)
