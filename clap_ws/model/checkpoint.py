"""What a LAION-CLAP checkpoint file holds, read safely.

A checkpoint is a pickle of a state dict. :func:`read_checkpoint` loads it
with ``weights_only=True`` (no code runs) and strips laion-clap's
``module.`` prefixes; :func:`detect_architecture` works out from the tensors
which network laion-clap must build, so nobody has to pass ``amodel``;
:class:`Identity` is what every reply says about the weights that produced
it. Nothing here builds a network: that is :mod:`clap_ws.model`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError

# HTSAT variants by the width of the patch embedding (laion-clap's htsat.py).
_HTSAT_BY_WIDTH = {96: "HTSAT-tiny", 128: "HTSAT-base", 256: "HTSAT-large"}
_PATCH_KEY = "audio_branch.patch_embed.proj.weight"
_FUSION_PREFIX = "audio_branch.patch_embed.fusion_model."


@dataclass(frozen=True)
class Architecture:
    """What laion-clap must build: an HTSAT audio encoder, fused or not."""

    audio: str = "HTSAT-tiny"
    fusion_type: str | None = None  # laion-clap's name, e.g. "aff_2d"

    @property
    def fusion(self) -> bool:
        return self.fusion_type is not None

    def describe(self) -> str:
        return self.audio + (f" + fusion ({self.fusion_type})" if self.fusion else "")


@dataclass(frozen=True)
class Preprocessing:
    """What a model family does to a 48 kHz window before its network, where families differ.

    LAION's ``.pt`` models follow laion-clap (int16 round trip; slaney mel
    filters, or HTK ones for the fusion input); a transformers folder follows
    its feature extractor's settings (no int16 step; filters chosen by its
    ``truncation``; its frequency range), so each family matches its own
    reference implementation.
    """

    family: str = "laion-clap"  # or "transformers"
    int16: bool = True  # laion-clap quantises to int16 and back; transformers does not
    mel_scale: str | None = None  # None: laion-clap's (slaney, HTK for the fusion input); else "slaney" or "htk"
    fmin: float = 50.0
    fmax: float = 14_000.0

    def describe(self) -> str:
        if self.mel_scale is None:
            return "laion-clap (int16 round trip)"
        return f"transformers ({self.mel_scale} mel {self.fmin:g}-{self.fmax:g} Hz, no int16 step)"


@dataclass(frozen=True)
class Identity:
    """Which weights produced an embedding; sent with every reply."""

    name: str  # checkpoint file name, repository id or folder name, or "untrained"
    sha256: str | None = None
    path: str | None = None
    seed: int | None = None

    @property
    def untrained(self) -> bool:
        return self.name == "untrained"


def detect_architecture(state_dict: dict) -> Architecture:
    """Work out laion-clap's ``amodel`` and fusion type from checkpoint tensors."""
    weight = state_dict.get(_PATCH_KEY)
    if weight is None:
        raise ModelError(
            f"not a LAION-CLAP HTSAT checkpoint: it has no {_PATCH_KEY!r} tensor "
            f"({len(state_dict)} tensors, e.g. {', '.join(list(state_dict)[:3])})"
        )
    audio = _HTSAT_BY_WIDTH.get(int(weight.shape[0]))
    if audio is None:
        raise ModelError(f"unknown HTSAT width {weight.shape[0]} (known: {sorted(_HTSAT_BY_WIDTH)})")
    fusion_keys = [k for k in state_dict if k.startswith(_FUSION_PREFIX)]
    if not fusion_keys:
        return Architecture(audio)
    if any(".local_att2." in k for k in fusion_keys):
        return Architecture(audio, "iaff_2d")
    return Architecture(audio, "aff_2d")


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
    """A checkpoint's state dict with laion-clap's ``module.`` prefixes removed.

    Loading uses ``weights_only=True``: a checkpoint is a pickle, and a full
    unpickle runs whatever code it names. ``allow_pickle`` lifts that for
    trusted files in an older format.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist (without weights, --untrained serves random ones "
                         "for tests and latency work)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":  # torch's zip format, or a legacy pickle
        raise ModelError(f"cannot read checkpoint {path}: not a file written by torch.save")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        raise ModelError(
            f"{path.name} holds objects other than tensors, which are not loaded "
            f"by default (a checkpoint is a pickle and can run code). If the file is "
            f"from a trusted source, pass --allow-pickle. {detail}".strip()
        ) from None
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path.name} holds no state_dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def sha256_of(*paths: str | os.PathLike) -> str:
    """The sha256 of the files' bytes, one after the other (a sharded model's shards, in order)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(functools.partial(f.read, 1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
