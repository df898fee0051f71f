"""The resident CLAP model: build it, load weights, run 10-second windows and text.

:class:`ClapModel` wraps laion-clap's own ``CLAP`` network (imported through
:mod:`clap_ws.laion`) so real LAION-CLAP checkpoints load unchanged. It knows
nothing about sockets or sample rates: its audio input is already a batch of
48 kHz windows of exactly 10 s (see :mod:`clap_ws.audio`), and it returns the
*raw* projected embeddings, so a caller can average several windows of one
clip before normalising.

Decisions made here, once, at construction:

* architecture - read from the checkpoint's tensors (HTSAT tiny/base/large,
  fusion or not), so picking the wrong ``amodel`` cannot happen;
* device - CUDA, then MPS, then CPU, unless told;
* precision - ``auto`` is bf16 on CUDA and on CPUs with native bf16
  (AVX512-BF16 or AMX), else fp32. The spectrogram front end always runs in
  fp32, which is where bf16 loses accuracy. On a CPU the other weights are
  cast to bf16 once; on a GPU the network runs under autocast (which re-casts
  weights on every call: measured 10% slower than cast-once on the CPU);
* chunk - how many windows go through the network at once. On a CPU, 2-4
  windows per call is fastest (measured per window, bf16: 1: 65 ms, 4: 58 ms,
  16: 80 ms; fp32 similar) and bounds activation memory, so ``auto`` is 4
  there and 32 on a GPU. Chunks are powers of two, so a compiled network
  sees only a few shapes;
* compile - optional ``torch.compile`` of the audio and text towers with
  Inductor's weight freezing: on a 2-core CPU about 25% less time per audio
  window (44 vs 60 ms) and 40% less per prompt (11 vs 20 ms), for 2-3
  minutes of compiling at warm-up (one graph per audio chunk shape, two for
  text: batch 1 and any batch, any length).

The network is never called from two threads at once: the batcher's single
worker owns it (see :mod:`clap_ws.batching`). Build it with
:func:`clap_ws.weights.load_model`, which builds on a thread that ends, or on
the thread that will run it: every thread that runs torch ops keeps an
OpenMP pool, and with two pools on a 2-core machine each model call took
50% longer.

Where the time goes (HTSAT-tiny, one 10-s window, 2 AVX512-BF16 cores): 12.1
GFLOP, 10.9 of them in matrix multiplies, which run at 326 GFLOP/s in bf16
(33 ms) - about what two such cores can do - so about 37 ms is the floor
here; eager calls take 55-60 ms, compiled ones 44-54 ms. Dynamic int8
weights were slower (74 ms) and less accurate (cosine 0.992 to fp32).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import pickle
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import laion
from .errors import ModelError, TextUnavailable
from .tokenizer import byte_level_tokenizer, tokenize

SAMPLE_RATE = 48_000
WINDOW_SAMPLES = 480_000  # CLAP sees 10 s at 48 kHz
EMBED_DIM = 512
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_CHUNK, GPU_CHUNK = 4, 32
_log = logging.getLogger(__name__)

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
class Identity:
    """Which weights produced an embedding; sent with every reply."""

    name: str  # checkpoint file name, or "untrained"
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
        raise ModelError(f"checkpoint {path} does not exist")
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


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX (Linux flags)."""
    if platform.system() != "Linux":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    if requested not in PRECISIONS:
        raise ModelError(f"precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if requested == "fp16" and device.type == "cpu":
        raise ModelError("fp16 is for GPUs; on a CPU use bf16 or fp32")
    return requested


def _fp32_forward(module: torch.nn.Module) -> None:
    """Run ``module`` in fp32 even inside an autocast region."""
    forward = module.forward
    device_type = next(module.buffers(), torch.empty(0)).device.type

    def fp32(x, *args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return forward(x.float(), *args, **kwargs)

    module.forward = fp32


def _fft_stft(stft: torch.nn.Module) -> bool:
    """Swap torchlibrosa's conv1d STFT for ``torch.stft`` when its kernels are a plain DFT.

    torchlibrosa computes the spectrogram as two 1024x513 convolutions (about
    2 GFLOP per 10-s window); an FFT gives the same numbers for a fraction of
    that. The kernels are frozen in every LAION-CLAP checkpoint, but they are
    checked here anyway: if they are not a windowed DFT, nothing is changed.
    """
    real, imag = stft.conv_real.weight[:, 0, :], stft.conv_imag.weight[:, 0, :]
    n_fft = real.shape[1]
    window = real[0].detach().clone()  # the k=0 row is the window itself
    angle = 2 * np.pi * torch.outer(torch.arange(real.shape[0], dtype=torch.float64),
                                    torch.arange(n_fft, dtype=torch.float64)) / n_fft
    expected = torch.cos(angle) * window.double(), torch.sin(angle) * window.double()
    if not (torch.allclose(real.double().cpu(), expected[0].cpu(), atol=1e-5)
            and torch.allclose(imag.double().abs().cpu(), expected[1].abs().cpu(), atol=1e-5)):
        return False
    hop, center, pad_mode = stft.hop_length, stft.center, stft.pad_mode

    def forward(x):
        spec = torch.stft(x.float(), n_fft, hop_length=hop, win_length=n_fft, window=window.to(x.device),
                          center=center, pad_mode=pad_mode, return_complex=True)
        spec = spec.transpose(1, 2)[:, None]  # (B, 1, T, F) like torchlibrosa
        return spec.real, spec.imag

    stft.forward = forward
    return True


def chunk_sizes(count: int, chunk: int) -> list[int]:
    """Split ``count`` windows into powers of two of at most ``chunk``, largest first."""
    sizes = []
    while count:
        size = min(chunk, 1 << (count.bit_length() - 1))
        size = 1 << (size.bit_length() - 1)
        sizes.append(size)
        count -= size
    return sizes


def _cast_weights(net: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast ``net`` to ``dtype`` once, keeping the spectrogram front end in fp32.

    The front end's output is cast to ``dtype`` for the layers after it.
    Idempotent, because tests build several :class:`ClapModel` on one network.
    """
    branch = net.audio_branch
    if getattr(branch, "_clap_ws_dtype", None) == dtype:
        return
    net.to(dtype)
    names = [n for n in ("spectrogram_extractor", "logmel_extractor") if hasattr(branch, n)]
    for name in names:
        getattr(branch, name).float()
    if names:
        last = getattr(branch, names[-1])
        forward = last.forward
        last.forward = lambda x, *args, **kwargs: forward(x.float(), *args, **kwargs).to(dtype)
    branch._clap_ws_dtype = dtype


class _AudioTower(torch.nn.Module):
    """Waveforms to raw audio embeddings: laion-clap's audio branch and projection as one module.

    It is the unit that ``torch.compile`` sees; eager models call it too, so
    both paths run the same code.
    """

    def __init__(self, net: torch.nn.Module, fusion: bool):
        super().__init__()
        self.branch, self.projection, self.fusion = net.audio_branch, net.audio_projection, fusion
        self.audio_cfg = net.audio_cfg

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        batch = {"waveform": waveform,
                 "longer": torch.zeros(waveform.shape[0], dtype=torch.bool, device=waveform.device)}
        if self.fusion:
            dtype = self.projection[0].weight.dtype
            batch["mel_fusion"] = fusion_mel(waveform, self.audio_cfg).to(dtype)
        return self.projection(self.branch(batch, mixup_lambda=None, device=waveform.device)["embedding"])


class _TextTower(torch.nn.Module):
    """Token ids to raw text embeddings: laion-clap's RoBERTa branch and projection as one module."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.branch, self.projection = net.text_branch, net.text_projection

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.projection(self.branch(input_ids=input_ids, attention_mask=attention_mask)["pooler_output"])


def fusion_mel(windows: torch.Tensor, audio_cfg) -> torch.Tensor:
    """laion-clap's fusion input for windows of <= 10 s: 4 copies of the log-mel.

    laion-clap computes it with torchaudio's MelSpectrogram (HTK mel scale, no
    filter normalisation, power 2, centred reflect padding) and
    ``AmplitudeToDB``; this is the same computation in plain torch, because
    torchaudio has no CPU build for every torch.
    """
    n_fft, hop = audio_cfg.window_size, audio_cfg.hop_size
    spec = torch.stft(
        windows.float(), n_fft, hop_length=hop, win_length=n_fft,
        window=torch.hann_window(n_fft, device=windows.device), center=True,
        pad_mode="reflect", return_complex=True,
    ).abs().pow(2)  # (B, F, T)
    freqs = torch.linspace(0, audio_cfg.sample_rate // 2, n_fft // 2 + 1, device=windows.device)

    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + f / 700.0)

    mels = torch.linspace(hz_to_mel(audio_cfg.fmin), hz_to_mel(audio_cfg.fmax),
                          audio_cfg.mel_bins + 2, device=windows.device)
    edges = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    slopes = edges[None, :] - freqs[:, None]
    widths = edges[1:] - edges[:-1]
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    bank = torch.clamp(torch.minimum(down, up), min=0)  # (F, mel_bins)
    mel = torch.einsum("bft,fm->btm", spec, bank)
    log_mel = 10.0 * torch.log10(torch.clamp(mel, min=1e-10))
    return log_mel[:, None].expand(-1, 4, -1, -1)  # (B, 4, T, mel_bins)


@dataclass
class ClapModel:
    """One CLAP network on one device, ready for inference. Build with a classmethod."""

    net: torch.nn.Module
    architecture: Architecture
    identity: Identity
    device: torch.device
    precision: str
    tokenizer: object | None = None
    tokenizer_source: str = "none"
    chunk: int = 0  # windows per network call; 0: 4 on a CPU, 32 elsewhere
    compile: bool = False
    _autocast: object = field(init=False, repr=False)
    _audio: object = field(init=False, repr=False)
    _text: object = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.net.eval()
        self.chunk = self.chunk or (CPU_CHUNK if self.device.type == "cpu" else GPU_CHUNK)
        if self.chunk < 1:
            raise ModelError(f"chunk must be at least 1 window, not {self.chunk}")
        self._logit_scale = float(self.net.logit_scale_a.detach().float().exp())
        branch = self.net.audio_branch
        if hasattr(branch, "spectrogram_extractor"):
            _fft_stft(branch.spectrogram_extractor.stft)
        self._autocast = contextlib.nullcontext
        if self.precision != "fp32" and self.device.type == "cpu":
            _cast_weights(self.net, _DTYPES[self.precision])
        elif self.precision != "fp32":
            self._autocast = functools.partial(torch.autocast, self.device.type, dtype=_DTYPES[self.precision])
            for name in ("spectrogram_extractor", "logmel_extractor"):
                if hasattr(branch, name):
                    _fp32_forward(getattr(branch, name))
        self._audio = _AudioTower(self.net, self.architecture.fusion)
        self._text = _TextTower(self.net)
        if self.compile:
            if self.architecture.fusion:
                raise ModelError("compile supports non-fusion checkpoints only (the fusion branch "
                                 "takes data-dependent paths); run fusion models without it")
            self._audio = torch.compile(self._audio, dynamic=False)
            self._text = torch.compile(self._text, dynamic=True)  # token counts vary

    # ---- construction -------------------------------------------------
    @staticmethod
    def build_network(architecture: Architecture) -> torch.nn.Module:
        module = laion.load_clap_module()
        cfg = laion.model_config(architecture.audio)
        cfg["text_cfg"]["model_type"] = "roberta"
        return module.CLAP(
            **cfg, enable_fusion=architecture.fusion, fusion_type=architecture.fusion_type or "None"
        )

    @classmethod
    def untrained(cls, architecture: Architecture = Architecture(), seed: int = 0, device: str | None = None,
                  precision: str = "auto", chunk: int = 0, compile: bool = False) -> "ClapModel":
        """laion-clap's architecture with seeded random weights. Its output means nothing."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = cls.build_network(architecture)
        dev = resolve_device(device)
        return cls(
            net.to(dev), architecture, Identity("untrained", seed=seed), dev,
            resolve_precision(precision, dev), byte_level_tokenizer(), "built-in byte-level BPE (untrained)",
            chunk, compile,
        )

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | None = None,
                        precision: str = "auto", tokenizer=None, tokenizer_source: str = "none",
                        allow_pickle: bool = False, chunk: int = 0, compile: bool = False) -> "ClapModel":
        """Load a LAION-CLAP checkpoint file; the architecture comes from its tensors."""
        path = Path(path)
        state = read_checkpoint(path, allow_pickle)
        architecture = detect_architecture(state)
        net = cls.build_network(architecture)
        expected = net.state_dict()
        # Saved by older transformers; recent ones keep it as a non-persistent buffer.
        state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelError(
                f"{path.name} does not fit laion-clap's {architecture.describe()}: "
                f"{len(missing)} missing tensors {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}"
            )
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(f"{path.name}: {str(exc).splitlines()[0]} ...") from None
        dev = resolve_device(device)
        identity = Identity(path.name, sha256_of(path), str(path.resolve()))
        return cls(net.to(dev), architecture, identity, dev, resolve_precision(precision, dev),
                   tokenizer, tokenizer_source, chunk, compile)

    # ---- inference (one thread at a time) -----------------------------
    def embed_windows(self, windows: np.ndarray) -> np.ndarray:
        """Raw (unnormalised) embeddings, shape (N, 512), of N 10-s 48 kHz windows."""
        out, start = [], 0
        for size in chunk_sizes(len(windows), self.chunk):
            out.append(self._embed_chunk(windows[start : start + size]))
            start += size
        return out[0] if len(out) == 1 else np.concatenate(out)

    @torch.inference_mode()
    def _embed_chunk(self, windows: np.ndarray) -> np.ndarray:
        waveform = torch.from_numpy(windows).to(self.device, non_blocking=True)
        with self._autocast():
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
        tokens = tokenize(self.tokenizer, texts)
        with self._autocast():
            out = self._text(tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device))
        return torch.nn.functional.normalize(out.float(), dim=-1).cpu().numpy()

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
            self.embed_windows(np.zeros((1, WINDOW_SAMPLES), dtype=np.float32))
            return
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=True):
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
            "dimension": EMBED_DIM,
            "model_sample_rate": SAMPLE_RATE,
            "text": self.tokenizer is not None,
            "tokenizer": self.tokenizer_source,
        }
