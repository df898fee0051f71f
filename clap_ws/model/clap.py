"""The resident CLAP model: build it, load weights, run 10-second windows and text.

:class:`ClapModel` wraps laion-clap's own ``CLAP`` network (imported through
:mod:`clap_ws.model.laion`) so real LAION-CLAP checkpoints load unchanged. It
knows nothing about sockets or sample rates: its audio input is already a
batch of 48 kHz windows of exactly 10 s (see :mod:`clap_ws.audio`), and it
returns the *raw* projected embeddings, so a caller can average several
windows of one clip before normalising.

Decisions made here, once, at construction:

* architecture - read from the checkpoint's tensors (HTSAT tiny/base/large,
  fusion or not; :mod:`clap_ws.model.checkpoint`), so picking the wrong
  ``amodel`` cannot happen;
* device - CUDA, then MPS, then CPU, unless told;
* precision - ``auto`` is bf16 on CUDA and on CPUs where oneDNN runs bf16
  natively (AVX512-BF16 or AMX, :func:`clap_ws.cpu.has_native_bf16`), else
  fp32: emulated bf16 is slower than fp32. The spectrogram front end always
  runs in fp32, which is where bf16 loses accuracy. On a CPU the other
  weights are cast once; on a GPU the network runs under autocast.
  ``autocast=True`` takes the GPU's way on a CPU, which is how the tests run
  that code where no GPU is lent. On a CPU the matmul weights are also laid
  out once for oneDNN (:func:`clap_ws.model.towers.pack_linears`), at the
  cost of a second copy of them;
* forwards - laion-clap's HTSAT and transformers' RoBERTa run inference
  forwards of their own modules (:mod:`clap_ws.model.swin`,
  :mod:`clap_ws.model.roberta`): the same weights and numbers, without the
  attention maps, unused outputs and extra copies;
* chunk - how many windows go through the network at once: ``auto`` is 4 on
  a CPU (where small calls are fastest per window and bound activation
  memory) and 32 on a GPU. Chunks are powers of two, so a compiled network
  sees only a few shapes;
* compile - optional ``torch.compile`` of the audio and text towers with
  Inductor's weight freezing, each tower whole (a graph break is an error),
  paid for with minutes of compiling at warm-up;
* engine - ``torch``, or ``openvino``: the audio encoder after its
  spectrogram front end compiled by OpenVINO (:mod:`clap_ws.model.openvino_audio`;
  CPU, non-fusion). Text stays in torch.

The network is never called from two threads at once: the batcher's single
worker owns it (see :mod:`clap_ws.batching`). Build it with
:func:`clap_ws.model.weights.load_model`, which builds on a thread that ends,
or on the thread that will run it, since every thread that runs torch ops
keeps an OpenMP pool and two pools on a small machine slow each call.
Figures for each of these choices: ``docs/performance.md`` and ``docs/experiments.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..constants import EMBED_DIM, SAMPLE_RATE, WINDOW_SAMPLES
from ..cpu import has_native_bf16
from ..errors import ModelError, TextUnavailable
from . import laion
from .checkpoint import (
    Architecture,
    Identity,
    Preprocessing,
    detect_architecture,
    read_checkpoint,
    sha256_of,
)
from .openvino_audio import OpenVinoAudio
from .swin import is_swin
from .tokenizer import MAX_TOKENS, byte_level_tokenizer, tokenize
from .towers import (
    AudioBody,
    AudioTower,
    FrontEnd,
    TextTower,
    can_pack_linears,
    cast_weights,
    chunk_sizes,
    int16_round_trip,
    own_copy,
    pack_linears,
)
from .transformers_folder import TransformersFolder, is_transformers_folder, mel_bank

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ENGINES = ("torch", "openvino")  # what a ClapModel runs; "auto" (weights.load_model) measures and picks one
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_CHUNK, GPU_CHUNK = 4, 32
TEXT_CHUNK = 64  # texts per text-tower call; 64 x 77 tokens need about 30 MB of activations
_log = logging.getLogger(__name__)

def resolve_device(requested: str | None = None) -> torch.device:
    """``cuda`` > ``mps`` > ``cpu`` unless ``requested`` (or ``CLAP_DEVICE``) names one."""
    requested = requested or os.environ.get("CLAP_DEVICE") or "auto"
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelError(f"unknown device {requested!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {requested!r} asked for, but torch sees no CUDA GPU")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {requested!r} asked for, but MPS is not available")
    return device


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and has_native_bf16():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ModelError("fp16 is for GPUs; on a CPU use bf16 or fp32")
    return requested


@dataclass(kw_only=True)
class ClapModel:
    """One CLAP network on one device, ready for inference.

    Build it with :meth:`untrained` or :meth:`from_checkpoint` (or
    :func:`clap_ws.model.weights.load_model`); the constructor takes keywords
    and adapts ``net`` in place (forwards, casting, packing) for inference.
    Raises :class:`~clap_ws.errors.ModelError` for options that cannot run
    together (an unknown engine, OpenVINO on a GPU or with fusion, compiling
    a fusion network, a chunk below 1).
    """

    net: Any  # laion-clap's CLAP module, reached into by attribute (torch types those as Tensor | Module)
    architecture: Architecture
    identity: Identity
    device: torch.device
    precision: str
    tokenizer: object | None = None
    tokenizer_source: str = "none"
    chunk: int = 0  # windows per network call; 0: 4 on a CPU, 32 elsewhere
    compile: bool = False
    engine: str = "torch"  # or "openvino": the audio encoder compiled by OpenVINO (CPU)
    autocast: bool | None = None  # reduced precision under autocast; None: on GPUs (a CPU casts weights once)
    pack: bool = True  # lay linears out once for oneDNN where that pays (a CPU); False: plain, for baselines
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # the family's steps before the network
    max_tokens: int = MAX_TOKENS  # longer texts are cut here (laion-clap: 77; transformers folders: 512)
    engine_cache: Path | None = None  # where OpenVINO keeps its export and compiled code across restarts
    engine_choice: Any = None  # what --engine auto measured (engine_choice.EngineChoice), if it chose
    _autocast: Callable[[], contextlib.AbstractContextManager] = field(init=False, repr=False)
    _openvino: OpenVinoAudio | None = field(init=False, repr=False, default=None)
    _audio: Callable[..., torch.Tensor] = field(init=False, repr=False)
    _front_end: FrontEnd = field(init=False, repr=False)
    _body: AudioBody = field(init=False, repr=False)
    _text: Callable[..., torch.Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._check_engine()  # before anything touches the network
        self.net.eval()
        self.chunk = self.chunk or (CPU_CHUNK if self.device.type == "cpu" else GPU_CHUNK)
        if self.chunk < 1:
            raise ModelError(f"chunk must be at least 1 window, not {self.chunk}")
        if self.autocast is None:
            self.autocast = self.device.type != "cpu"
        self._logit_scale = float(self.net.logit_scale_a.detach().float().exp())
        if not is_swin(self.net.audio_branch):
            raise ModelError("clap-ws serves HTSAT audio encoders only (the network has no Swin layers)")
        if self.engine == "openvino":  # exported from the fp32 weights, before any cast; its own precision hint
            body = AudioBody.of(self.net)
            with torch.inference_mode():
                mel = FrontEnd(self.net.audio_branch)(torch.zeros(1, WINDOW_SAMPLES, device=self.device))
            self._openvino = OpenVinoAudio(body, (mel.shape[2], mel.shape[3]), self.precision, self.chunk,
                                           torch.get_num_threads(), self.engine_cache, self._export_key())
        dtype = _DTYPES[self.precision]
        cast = self.precision != "fp32" and not self.autocast
        if cast:  # the weights, once (under autocast they stay fp32 and each call casts)
            cast_weights(self.net, dtype)
        self._autocast = contextlib.nullcontext
        if self.precision != "fp32" and self.autocast:
            self._autocast = functools.partial(torch.autocast, self.device.type, dtype=dtype)
        own: Any = own_copy(self.net)  # this model's modules over the network's weights (towers.own_copy)
        self._front_end = FrontEnd(own.audio_branch, dtype if cast else None)
        body = AudioBody(own.audio_branch, own.audio_projection)
        self._audio = AudioTower(self._front_end, body, self.architecture.fusion, self.net.audio_cfg,
                                 fusion_from_front_end=self.preprocessing.mel_scale is not None)
        self._text = TextTower(own.text_branch, own.text_projection)
        self._body = body
        if self.pack and not self.compile and not self.autocast and can_pack_linears(self.device, dtype):
            pack_linears(self._text)
            if self._openvino is None:
                pack_linears(self._audio)
        if self.compile:
            if self.architecture.fusion:
                raise ModelError("compile supports non-fusion checkpoints only (the fusion branch "
                                 "takes data-dependent paths); run fusion models without it")
            # fullgraph: a graph break is an error, not a silent split into smaller graphs
            self._audio = torch.compile(self._audio, dynamic=False, fullgraph=True)
            self._text = torch.compile(self._text, dynamic=True, fullgraph=True)  # token counts vary

    def _check_engine(self) -> None:
        if self.engine not in ENGINES:
            raise ModelError(f"unknown engine {self.engine!r}: one of {', '.join(ENGINES)}")
        if self.engine == "torch":
            return
        if self.device.type != "cpu":
            raise ModelError(f"--engine openvino runs on the CPU, not on {self.device}; leave --engine out there")
        if self.architecture.fusion:
            raise ModelError("--engine openvino supports non-fusion checkpoints only (the fusion branch takes "
                             "data-dependent paths); run fusion models with --engine torch")
        if self.compile:
            raise ModelError("--engine openvino and --compile are two ways to compile the audio encoder: pick one")

    def _export_key(self) -> str:
        """What identifies the exported audio body: the weights, the architecture and the code that exports."""
        import hashlib

        from .. import __version__

        ident = self.identity
        parts = [ident.sha256 or f"untrained-{ident.seed}", self.architecture.describe(), __version__,
                 torch.__version__]
        return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:32]

    # ---- construction -------------------------------------------------
    def variant(self, **changes) -> ClapModel:
        """Another model over this one's network with some options changed (``tokenizer``, ``chunk``, ...).

        The weights are shared, not copied; each model adapts modules of its
        own (:func:`~clap_ws.model.towers.own_copy`), so the two never see
        each other's layout. A network already cast to bf16 stays bf16 whatever
        the variant's precision says.
        """
        return dataclasses.replace(self, **changes)

    @staticmethod
    def build_network(architecture: Architecture) -> torch.nn.Module:
        module = laion.load_clap_module()
        cfg = laion.model_config(architecture.audio)
        cfg["text_cfg"]["model_type"] = "roberta"
        with warnings.catch_warnings():  # laion-clap's Swin calls torch.meshgrid the old way; nothing to act on
            warnings.filterwarnings("ignore", message="torch.meshgrid", category=UserWarning)
            return module.CLAP(
                **cfg, enable_fusion=architecture.fusion, fusion_type=architecture.fusion_type or "None"
            )

    @classmethod
    def untrained(cls, architecture: Architecture | None = None, seed: int = 0, device: str | None = None,
                  precision: str = "auto", **options) -> ClapModel:
        """laion-clap's architecture with seeded random weights. Its output means nothing. ``options``: the
        constructor's (``chunk``, ``compile``, ``engine``, ``engine_cache``, ``pack``)."""
        architecture = architecture or Architecture()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = cls.build_network(architecture)
        dev = resolve_device(device)
        return cls(net=net.to(dev), architecture=architecture, identity=Identity("untrained", seed=seed), device=dev,
                   precision=resolve_precision(precision, dev), tokenizer=byte_level_tokenizer(),
                   tokenizer_source="built-in byte-level BPE (untrained)", **options)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | None = None,
                        precision: str = "auto", tokenizer=None, tokenizer_source: str = "none",
                        allow_pickle: bool = False, **options) -> ClapModel:
        """Load a LAION-CLAP checkpoint file (the architecture comes from its tensors), or a transformers
        folder (:meth:`from_transformers`). ``options``: the constructor's (``chunk``, ``engine``, ...)."""
        path = Path(path)
        if is_transformers_folder(path):
            return cls.from_transformers(Path(path), device=device, precision=precision, tokenizer=tokenizer,
                                         tokenizer_source=tokenizer_source, **options)
        state = read_checkpoint(path, allow_pickle)
        architecture = detect_architecture(state)
        net = cls.build_network(architecture)
        _load_weights(net, state, f"{path.name} does not fit laion-clap's {architecture.describe()}")
        dev = resolve_device(device)
        identity = Identity(path.name, sha256_of(path), str(path.resolve()))
        return cls(net=net.to(dev), architecture=architecture, identity=identity, device=dev,
                   precision=resolve_precision(precision, dev), tokenizer=tokenizer, tokenizer_source=tokenizer_source,
                   **options)

    @classmethod
    def from_transformers(cls, folder: str | Path | TransformersFolder, name: str | None = None,
                          device: str | None = None, precision: str = "auto", tokenizer=None,
                          tokenizer_source: str | None = None, **options) -> ClapModel:
        """Load a transformers CLAP folder (``save_pretrained``, a Hub snapshot) into laion-clap's network.

        The architecture comes from ``config.json`` and is checked against the
        weights; the tokenizer comes from the folder unless one is given; the
        front end follows the folder's feature-extractor settings
        (:class:`~clap_ws.model.checkpoint.Preprocessing`), so embeddings match
        transformers' ``get_audio_features``. Raises
        :class:`~clap_ws.errors.ModelError` naming what does not fit.
        """
        hf = folder if isinstance(folder, TransformersFolder) else TransformersFolder.read(folder, name)
        if tokenizer is None:
            tokenizer, tokenizer_source = hf.tokenizer(), f"{hf.name} (the folder's own)"
        net: Any = cls.build_network(hf.architecture)
        _load_weights(net, hf.state_dict(net.state_dict()),
                      f"{hf.path}: the weights do not fit the {hf.architecture.describe()} that config.json describes")
        with torch.no_grad():
            net.audio_branch.logmel_extractor.melW.copy_(torch.from_numpy(mel_bank(hf.preprocessing)))
        dev = resolve_device(device)
        max_tokens = min(getattr(tokenizer, "model_max_length", 512), hf.text_config["max_position_embeddings"] - 2)
        return cls(net=net.to(dev), architecture=hf.architecture, identity=Identity(hf.name, hf.sha256(),
                   str(hf.path.resolve())), device=dev, precision=resolve_precision(precision, dev),
                   tokenizer=tokenizer, tokenizer_source=tokenizer_source or "given",
                   preprocessing=hf.preprocessing, max_tokens=max_tokens, **options)

    # ---- inference (one thread at a time) -----------------------------
    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) embeddings, shape (N, 512), of N 10-s 48 kHz windows.

        LAION models first take the windows through laion-clap's int16 round
        trip; transformers folders do not (transformers has no such step).
        """
        out, start = [], 0
        for size in chunk_sizes(len(windows), self.chunk):
            out.append(self._embed_chunk(windows[start : start + size]))
            start += size
        return out[0] if len(out) == 1 else np.concatenate(out)

    @torch.inference_mode()
    def _embed_chunk(self, windows: np.ndarray) -> np.ndarray:
        windows = int16_round_trip(windows) if self.preprocessing.int16 else np.ascontiguousarray(windows)
        # One layout for every input: a size-1 axis may carry any stride (``clip[None]`` has 0), and a
        # compiled tower is specialised on strides, so it would recompile (7 s) on the first real sound.
        waveform = torch.from_numpy(windows).as_strided(windows.shape, (windows.shape[1], 1))
        waveform = waveform.to(self.device, non_blocking=True)
        with self._autocast():
            if self._openvino is not None:
                return self._openvino(self._front_end(waveform))
            return self._audio(waveform).float().cpu().numpy()

    @torch.inference_mode()
    def embed_text(self, texts: list[str]) -> np.ndarray:
        """L2-normalised text embeddings, shape (N, 512)."""
        if self.tokenizer is None:
            raise TextUnavailable(
                "text features need the roberta-base tokenizer files, which were not found: "
                "run `clap-ws download` or set CLAP_TOKENIZER_DIR to a folder with vocab.json "
                "and merges.txt"
            )
        if not texts:
            return np.zeros((0, EMBED_DIM), dtype=np.float32)
        out = []
        for start in range(0, len(texts), TEXT_CHUNK):  # bounds the activations of a big batch
            tokens = tokenize(self.tokenizer, texts[start : start + TEXT_CHUNK], self.max_tokens)
            with self._autocast():
                raw = self._text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
            out.append(torch.nn.functional.normalize(raw.float(), dim=-1).cpu().numpy())
        return out[0] if len(out) == 1 else np.concatenate(out)

    def silent(self, windows: np.ndarray) -> bool:
        """Whether ``windows`` reach the network as all zeros (below int16's step, for LAION models)."""
        peak = max(float(windows.max(initial=0.0)), -float(windows.min(initial=0.0)))  # no |x| copy
        return peak * 32767.0 < 1.0 if self.preprocessing.int16 else peak == 0.0

    @property
    def audio_body(self) -> AudioBody:
        """The audio tower after its front end, as this model runs it (for engine benchmarks)."""
        return self._body

    @property
    def logit_scale(self) -> float:
        """CLAP's learnt audio-to-text temperature, for zero-shot ``probs``."""
        return self._logit_scale

    def warm_up(self) -> None:
        """Silence through the model, so the first client does not pay for first-call setup.

        A compiled model is compiled here, with Inductor's weight freezing (it
        folds the frozen weights into the compiled graph): the audio tower once
        per chunk shape, the text tower for one text and for several.
        """
        if not self.compile:
            for size in self._openvino.sizes if self._openvino else [1]:  # OpenVINO: compiles each shape
                self._embed_chunk(np.zeros((size, WINDOW_SAMPLES), dtype=np.float32))
            return
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True), warnings.catch_warnings():
            # the spectrogram's FFT is complex, which Inductor leaves to eager code, as intended
            warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
            size = 1
            while size <= self.chunk:
                started = time.perf_counter()
                self._embed_chunk(np.zeros((size, WINDOW_SAMPLES), dtype=np.float32))
                _log.info("compiled the audio tower for %d window(s) in %.0f s", size, time.perf_counter() - started)
                size *= 2
            if self.tokenizer is not None:
                for texts in (["a warm bell"], ["a bell", "a long bright metallic drone"]):
                    started = time.perf_counter()
                    self.embed_text(texts)
                    _log.info("compiled the text tower for %d text(s) in %.0f s", len(texts),
                              time.perf_counter() - started)

    def describe(self) -> dict:
        """The model part of the ``info`` reply."""
        return {
            "model": self.identity.name,
            "untrained": self.identity.untrained,
            "checkpoint_sha256": self.identity.sha256,
            "seed": self.identity.seed,
            "architecture": self.architecture.describe(),
            "device": str(self.device),
            "precision": self.precision,
            "chunk": self.chunk,
            "compiled": self.compile,
            "engine": f"openvino {self._openvino.version}" if self._openvino else "torch",
            "engine_auto": self.engine_choice.describe() if self.engine_choice else None,
            "dimension": EMBED_DIM,
            "model_sample_rate": SAMPLE_RATE,
            "text": self.tokenizer is not None,
            "tokenizer": self.tokenizer_source,
            "preprocessing": self.preprocessing.describe(),
        }


def _load_weights(net: torch.nn.Module, state: dict, what: str) -> None:
    """Load ``state`` into ``net``, every tensor accounted for; :class:`ModelError` opening with ``what`` if not."""
    expected = net.state_dict()
    # Saved by older transformers; recent ones keep it as a non-persistent buffer.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{what}: {len(missing)} missing tensors {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}")
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        raise ModelError(f"{what}: {len(wrong)} tensors of the wrong shape, e.g. {wrong[0][0]} "
                         f"{wrong[0][1]} where {wrong[0][2]} is expected")
    net.load_state_dict(state, strict=True)


def model_identity(model: ClapModel) -> dict:
    """What must match between a library and the server's model."""
    ident = model.identity
    return {"name": ident.name, "sha256": ident.sha256, "seed": ident.seed,
            "architecture": model.architecture.describe()}
