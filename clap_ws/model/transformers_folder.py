"""Hugging Face transformers CLAP folders, read and converted into the network clap-ws runs.

A folder written by ``transformers.ClapModel.save_pretrained`` (what
``laion/clap-htsat-unfused``, ``laion/larger_clap_general`` and the others
are on the Hub) holds ``config.json``, the weights (``model.safetensors`` or
``pytorch_model.bin``, perhaps sharded), the tokenizer (``tokenizer.json`` or
``vocab.json`` + ``merges.txt``) and the feature extractor's settings
(``preprocessor_config.json``, or inside ``processor_config.json`` as
transformers 5 writes them).

:meth:`TransformersFolder.read` checks all of that against what clap-ws can
run and says precisely what does not fit; :func:`to_laion` renames the
weights into laion-clap's network (the one LAION ``.pt`` checkpoints load
into), so bf16, engines, compile and chunking apply unchanged;
:func:`to_transformers` is its inverse (a ``.pt`` exported as a folder).
:func:`hub_snapshot` finds ``ORG/NAME`` in the local Hugging Face cache
(offline unless told to download). Building the model is
:meth:`clap_ws.model.ClapModel.from_transformers`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import SAMPLE_RATE
from ..errors import ModelError
from .checkpoint import Architecture, Preprocessing, sha256_of

# HTSAT variants by patch-embedding width, with the depths laion-clap builds for each (htsat.py).
_HTSAT = {96: ("HTSAT-tiny", [2, 2, 6, 2]), 128: ("HTSAT-base", [2, 2, 12, 2]), 256: ("HTSAT-large", [2, 2, 12, 2])}
# What laion-clap's network has that a transformers folder does not carry: the classifier head and the
# projection "transforms" (training only), and the fixed front end and shift masks (rebuilt identically).
_NOT_IN_TRANSFORMERS = re.compile(r"^audio_branch\.(head|tscam_conv|spectrogram_extractor|logmel_extractor)\.|"
                                  r"\.attn_mask$|^(audio|text)_transform\.")
# roberta-base, the text tower laion-clap builds (clap_ws.model.laion.ROBERTA_BASE_CONFIG)
_TEXT = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
         "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1}
_FRONT_END = {"sampling_rate": SAMPLE_RATE, "feature_size": 64, "fft_window_size": 1024, "hop_length": 480,
              "max_length_s": 10}
_log = logging.getLogger(__name__)

_AUDIO_RENAMES = [  # transformers -> laion-clap, inside audio_model.audio_encoder / audio_branch; order matters
    (".attention.self.relative_position", ".attn.relative_position"),
    (".attention.output.dense.", ".attn.proj."),
    (".intermediate.dense.", ".mlp.fc1."),
    (".output.dense.", ".mlp.fc2."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
]


def to_laion(state: dict) -> dict:
    """A transformers ``ClapModel`` state dict renamed into laion-clap's ``CLAP`` (query, key and value
    joined into one ``qkv``); the parts transformers does not carry are left out."""
    out: dict = {}
    qkv: dict = {}
    for key, value in state.items():
        if key.endswith(("position_ids", "token_type_ids")):  # buffers, rebuilt
            continue
        new = key
        if key.startswith("audio_model.audio_encoder."):
            new = "audio_branch." + key[len("audio_model.audio_encoder."):]
            new = new.replace("audio_branch.batch_norm.", "audio_branch.bn0.")
            part = re.match(r"(.*\.blocks\.\d+)\.attention\.self\.(query|key|value)\.(weight|bias)$", new)
            if part:
                qkv.setdefault((part[1], part[3]), {})[part[2]] = value
                continue
            for theirs, ours in _AUDIO_RENAMES:
                new = new.replace(theirs, ours)
        elif key.startswith("text_model."):
            new = "text_branch." + key[len("text_model."):]
        new = re.sub(r"^(audio|text)_projection\.linear1\.", r"\1_projection.0.", new)
        new = re.sub(r"^(audio|text)_projection\.linear2\.", r"\1_projection.2.", new)
        out[new] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ModelError(f"{block}: attention {kind} has {sorted(parts)}, not query, key and value")
        out[f"{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def to_transformers(state: dict) -> dict:
    """laion-clap's state dict renamed into transformers' ``ClapModel`` (the inverse of :func:`to_laion`)."""
    out: dict = {}
    for key, value in state.items():
        if _NOT_IN_TRANSFORMERS.search(key) or key.endswith("position_ids"):
            continue
        new = key
        if key.startswith("audio_branch."):
            new = "audio_model.audio_encoder." + key[len("audio_branch."):]
            new = new.replace(".bn0.", ".batch_norm.")
            if new.endswith((".attn.qkv.weight", ".attn.qkv.bias")):
                stem, kind = new.rsplit(".attn.qkv.", 1)
                for name, part in zip(("query", "key", "value"), value.chunk(3)):
                    out[f"{stem}.attention.self.{name}.{kind}"] = part.clone()
                continue
            for theirs, ours in reversed(_AUDIO_RENAMES):
                new = new.replace(ours, theirs)
        elif key.startswith("text_branch."):
            new = "text_model." + key[len("text_branch."):]
        new = re.sub(r"^(audio|text)_projection\.0\.", r"\1_projection.linear1.", new)
        new = re.sub(r"^(audio|text)_projection\.2\.", r"\1_projection.linear2.", new)
        out[new] = value
    return out


def is_transformers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def mel_bank(preprocessing: Preprocessing) -> np.ndarray:
    """The (513, 64) mel filters transformers' ``ClapFeatureExtractor`` uses for these settings."""
    from transformers.audio_utils import mel_filter_bank

    slaney = preprocessing.mel_scale == "slaney"
    return mel_filter_bank(num_frequency_bins=_FRONT_END["fft_window_size"] // 2 + 1,
                           num_mel_filters=_FRONT_END["feature_size"], min_frequency=preprocessing.fmin,
                           max_frequency=preprocessing.fmax, sampling_rate=SAMPLE_RATE,
                           norm="slaney" if slaney else None, mel_scale="slaney" if slaney else "htk")


@dataclass(frozen=True)
class TransformersFolder:
    """A checked transformers CLAP folder: what to build, how to preprocess, where the weights are."""

    path: Path
    name: str
    architecture: Architecture
    preprocessing: Preprocessing
    weight_files: tuple[Path, ...]
    text_config: dict

    @classmethod
    def read(cls, path: str | Path, name: str | None = None) -> TransformersFolder:
        """Check a folder's config, weights and feature-extractor settings; :class:`ModelError` says what is wrong."""
        path = Path(path).expanduser()
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"{path}: cannot read config.json ({exc})") from None
        if config.get("model_type") != "clap":
            raise ModelError(f"{path} holds a {config.get('model_type')!r} model (config.json model_type), "
                             f"not a CLAP one ('clap')")
        from transformers import ClapConfig

        clap: Any = ClapConfig.from_dict(config)
        text = clap.text_config.to_dict()
        _check_text(path, text)
        return cls(path=path, name=name or path.name, architecture=_architecture(path, clap.audio_config),
                   preprocessing=_preprocessing(path), weight_files=_weight_files(path), text_config=text)

    def state_dict(self, network: dict) -> dict:
        """The weights renamed for laion-clap's network (:func:`to_laion`), completed from ``network`` (that
        network's own state) with what a transformers folder does not carry: the fixed front end, the
        unused classifier head and transforms."""
        own = {k: v for k, v in network.items() if _NOT_IN_TRANSFORMERS.search(k)}
        state: dict = {}
        for file in self.weight_files:
            try:
                if file.suffix == ".safetensors":
                    from safetensors.torch import load_file

                    state.update(load_file(str(file)))
                else:
                    state.update(torch.load(file, map_location="cpu", weights_only=True))
            except Exception as exc:
                raise ModelError(f"cannot read weights {file}: {str(exc).splitlines()[0]}") from None
        return {**own, **to_laion(state)}

    def sha256(self) -> str:
        return sha256_of(*self.weight_files)

    def tokenizer(self):
        """The folder's own tokenizer, checked to tokenise (a malformed ``tokenizer.json`` can load as an
        empty five-token BPE that gives every text the same ids)."""
        has_json = (self.path / "tokenizer.json").is_file()
        if not has_json and not ((self.path / "vocab.json").is_file() and (self.path / "merges.txt").is_file()):
            raise ModelError(f"{self.path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                             f"pass --tokenizer DIR with roberta-base's files")
        from transformers import RobertaTokenizer

        try:
            tokenizer = RobertaTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as exc:
            raise ModelError(f"cannot load the tokenizer in {self.path}: {str(exc).splitlines()[0]}") from None
        check_tokenizer(tokenizer, str(self.path))
        return tokenizer


def check_tokenizer(tokenizer, where: str) -> None:
    """:class:`ModelError` unless ``tokenizer`` splits text into distinct, known tokens."""
    probes = ["a dog barking in the rain", "glass breaking"]
    ids = [tokenizer(text)["input_ids"] for text in probes]
    unk = getattr(tokenizer, "unk_token_id", None)
    known = [i for row in ids for i in row if i != unk]
    if len(tokenizer) <= 256 or ids[0] == ids[1] or len(set(known)) < 4:
        raise ModelError(f"the tokenizer in {where} does not tokenise ({len(tokenizer)} tokens; "
                         f"{probes[0]!r} -> {ids[0]}): its tokenizer.json is probably malformed")


def _architecture(path: Path, audio) -> Architecture:
    width = audio.patch_embeds_hidden_size
    if width not in _HTSAT:
        raise ModelError(f"{path}: audio patch_embeds_hidden_size {width} is no HTSAT that clap-ws runs "
                         f"({', '.join(f'{w}: {n}' for w, (n, _) in _HTSAT.items())})")
    name, depths = _HTSAT[width]
    expected = {"depths": depths, "hidden_size": width * 8, "num_attention_heads": [4, 8, 16, 32],
                "window_size": 8, "spec_size": 256, "num_mel_bins": 64, "projection_dim": 512,
                "projection_hidden_act": "relu"}
    wrong = {k: getattr(audio, k) for k, v in expected.items() if list_or(getattr(audio, k)) != list_or(v)}
    if wrong:
        raise ModelError(f"{path}: audio_config {wrong} does not match {name} "
                         f"({ {k: expected[k] for k in wrong} })")
    if not audio.enable_fusion:
        return Architecture(name)
    if audio.fusion_type not in (None, "aff_2d"):
        raise ModelError(f"{path}: fusion_type {audio.fusion_type!r}; transformers and clap-ws run aff_2d fusion")
    return Architecture(name, "aff_2d")


def list_or(value):
    return list(value) if isinstance(value, list | tuple) else value


def _check_text(path: Path, text: dict) -> None:
    wrong = {k: text.get(k) for k, v in _TEXT.items() if text.get(k) != v}
    if text.get("projection_dim", 512) != 512 or text.get("projection_hidden_act", "relu") != "relu":
        wrong["projection"] = (text.get("projection_dim"), text.get("projection_hidden_act"))
    if wrong:
        raise ModelError(f"{path}: text_config {wrong} is not CLAP's roberta-base text tower "
                         f"({ {k: _TEXT.get(k) for k in wrong} })")


def _weight_files(path: Path) -> tuple[Path, ...]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).is_file():
            return (path / single,)
        if (path / index).is_file():
            try:
                shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise ModelError(f"{path / index}: cannot read the shard index ({exc})") from None
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ModelError(f"{path}: shards {missing} named in {index} are missing")
            return tuple(path / s for s in shards)
    raise ModelError(f"{path} has a config.json but no weights (model.safetensors or pytorch_model.bin)")


def _preprocessing(path: Path) -> Preprocessing:
    """The feature extractor's settings that matter for the embedding (``preprocessor_config.json``, or
    transformers 5's ``processor_config.json``); transformers' defaults, with a warning, when neither exists."""
    settings = None
    for name, pick in (("preprocessor_config.json", lambda d: d),
                       ("processor_config.json", lambda d: d.get("feature_extractor"))):
        if (path / name).is_file():
            try:
                settings = pick(json.loads((path / name).read_text()))
            except (OSError, ValueError) as exc:
                raise ModelError(f"{path / name}: cannot read ({exc})") from None
            if settings:
                break
    if not settings:
        from transformers import ClapFeatureExtractor

        settings = ClapFeatureExtractor().to_dict()
        _log.warning("%s has no feature-extractor settings (preprocessor_config.json or processor_config.json): "
                     "using transformers' defaults (truncation %s, %s-%s Hz)", path, settings["truncation"],
                     settings["frequency_min"], settings["frequency_max"])
    wrong = {k: settings[k] for k, v in _FRONT_END.items() if k in settings and settings[k] != v}
    if wrong:
        raise ModelError(f"{path}: feature extractor {wrong} differs from CLAP's fixed front end {_FRONT_END}")
    if settings.get("padding", "repeatpad") != "repeatpad":
        _log.warning("%s pads short clips by %r; clap-ws pads by repeatpad, so clips under 10 s embed differently",
                     path, settings["padding"])
    if settings.get("top_db") is not None:
        _log.warning("%s limits the log-mel range (top_db %s); clap-ws does not", path, settings["top_db"])
    truncation = settings.get("truncation", "fusion")
    return Preprocessing(family="transformers", int16=False, mel_scale="htk" if truncation == "fusion" else "slaney",
                         fmin=float(settings.get("frequency_min", 0)), fmax=float(settings.get("frequency_max", 14000)))


def hub_snapshot(repo_id: str, download: bool = False) -> Path:
    """``ORG/NAME``'s folder in the local Hugging Face cache (``HF_HOME``, ``HF_HUB_CACHE``); fetched first only
    when ``download``. Nothing goes to the network otherwise."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ModelError("--model needs huggingface_hub (pip install huggingface_hub)") from None
    from huggingface_hub import constants

    if not download:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True))
        except LocalEntryNotFoundError:
            raise ModelError(f"{repo_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}); fetch it with "
                             f"`clap-ws download {repo_id}` (network), or point --checkpoint at its folder") from None
        except Exception as exc:
            raise ModelError(f"cannot look up {repo_id} in the Hugging Face cache: {exc}") from None
    files = ["*.json", "merges.txt"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*files, "model*.safetensors"]))
        if not any(folder.glob("model*.safetensors")):  # older repositories have only pytorch_model.bin
            folder = Path(snapshot_download(repo_id, allow_patterns=[*files, "pytorch_model*.bin"]))
    except Exception as exc:
        raise ModelError(f"download of {repo_id} failed ({str(exc).splitlines()[0]}); nothing was retried") from None
    return folder
