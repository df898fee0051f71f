"""Behaviour descriptors: a projection from 512-d embeddings to a few dimensions.

Quality-diversity algorithms (MAP-Elites and kin) place each sound in a
low-dimensional behaviour space. ``--projection FILE`` loads one, and
connections on the path ``/clap-bd`` get ``behavior_descriptor`` next to the
embedding. Formats:

* ``.npz`` with ``components`` (d x 512) and optional ``mean`` (512): PCA,
  ``(x - mean) @ components.T``;
* ``.npz`` with ``weight`` (d x 512) and optional ``bias`` (d): linear,
  ``x @ weight.T + bias``;
* anything else: a TorchScript module (``torch.jit.save``) mapping an (n, 512)
  float32 tensor to (n, d). TorchScript is code: load only files you trust.

The file is read once, only from the path the operator gives.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .constants import EMBED_DIM
from .errors import ModelError


class Projection:
    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], dims: int, source: str):
        self.fn, self.dims, self.source = fn, dims, source

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(np.atleast_2d(embeddings).astype(np.float32)), dtype=np.float32)

    @classmethod
    def load(cls, path: str | Path) -> Projection:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"projection file {path} does not exist")
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k].astype(np.float32) for k in data.files}
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
