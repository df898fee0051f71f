"""Raw PCM bytes to the 10-second 48 kHz windows CLAP takes.

The pipeline is pure numpy (plus soxr) and runs once per request:

    decode_pcm -> downmix -> resample (soxr HQ) -> optional peak normalise
    -> windows (repeat-padding or 10-s windows)

Everything a client can get wrong about audio is caught here and raised as
:class:`~clap_ws.errors.AudioError` with a code and a message that says what
was wrong, before any work is queued.

Windowing follows laion-clap (and transformers' ``repeatpad``) for clips up
to 10 s: repeat the clip to fill 10 s, zero-pad the rest. laion-clap's int16
round trip (:func:`clap_ws.model.towers.int16_round_trip`) is the model's step, since transformers has
none (:class:`clap_ws.model.checkpoint.Preprocessing`). For longer clips laion-clap
crops at random; here the choice is deterministic (``long_clip``):

* ``mean`` (default) - consecutive 10-s windows covering the whole clip, the
  last one aligned to the clip's end; the caller averages their raw outputs;
* ``head`` - the first 10 s;
* ``center`` - the middle 10 s.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import soxr

from .constants import SAMPLE_RATE, WINDOW_SAMPLES
from .errors import AudioError, ErrorCode

MIN_RATE, MAX_RATE = 8_000, 192_000
LONG_CLIP_MODES = ("mean", "head", "center")
NORMALIZE_MODES = ("none", "peak")


@dataclass(frozen=True)
class AudioSpec:
    """How to read one buffer: its rate, channel count and treatment."""

    sample_rate: float = SAMPLE_RATE
    channels: int = 1
    normalize: str = "none"
    long_clip: str = "mean"


def decode_pcm(data: bytes | bytearray | memoryview, channels: int = 1) -> np.ndarray:
    """Interleaved little-endian float32 bytes -> (frames, channels) array, no copy."""
    size = memoryview(data).nbytes
    if size == 0:
        raise AudioError("the audio buffer is empty")
    frame_bytes = 4 * channels
    if size % frame_bytes:
        raise AudioError(
            f"the audio buffer has {size} bytes, not a multiple of {frame_bytes} "
            f"(4-byte float32 samples x {channels} channel{'s' if channels > 1 else ''})"
        )
    return np.frombuffer(data, dtype="<f4").reshape(-1, channels)


def to_mono(frames: np.ndarray) -> np.ndarray:
    """Average interleaved channels; a mono buffer passes through as a view."""
    if frames.shape[1] == 1:
        return frames[:, 0]
    return frames.mean(axis=1, dtype=np.float32)


def check_rate(sample_rate: float) -> None:
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise AudioError(
            f"sample_rate {sample_rate:g} is out of range ({MIN_RATE}-{MAX_RATE} Hz)",
            code=ErrorCode.BAD_SAMPLE_RATE,
        )


def load(data: bytes | bytearray | memoryview, spec: AudioSpec, max_seconds: float,
         warnings: list[str] | None = None) -> np.ndarray:
    """Decode, validate and resample one buffer to 48 kHz mono float32 (``warnings``: see :func:`prepare`)."""
    check_rate(spec.sample_rate)
    return prepare(decode_pcm(data, spec.channels), spec, max_seconds, warnings)


def prepare(frames: np.ndarray, spec: AudioSpec, max_seconds: float,
            warnings: list[str] | None = None) -> np.ndarray:
    """Validate, downmix and resample decoded (frames, channels) float32 audio.

    Raises :class:`~clap_ws.errors.AudioError` for empty, too long, NaN or
    infinite audio. Samples beyond [-1, 1], which CLAP will clip, are accepted
    and described in ``warnings`` when a list is given (not with
    ``normalize=peak``, which scales them into range first).
    """
    if len(frames) == 0:
        raise AudioError("the audio is empty")
    seconds = len(frames) / spec.sample_rate
    if seconds > max_seconds:
        raise AudioError(
            f"the audio is {seconds:.2f} s long; this server takes at most {max_seconds:g} s per clip",
            code=ErrorCode.TOO_LONG,
        )
    high, low = float(frames.max()), float(frames.min())  # NaN propagates through both
    if not (np.isfinite(high) and np.isfinite(low)):
        raise AudioError("the audio contains NaN or infinite samples: clap-ws reads little-endian float32 "
                         "samples in [-1, 1], and 16-bit integer PCM read as float32 looks like this "
                         "(send int16 samples / 32768 as float32)")
    peak = max(high, -low)
    if peak > 1.0 and warnings is not None and spec.normalize != "peak":
        warnings.append(_clipping_warning(frames, peak))
    mono = to_mono(frames)
    if spec.sample_rate != SAMPLE_RATE:
        mono = soxr.resample(mono, spec.sample_rate, SAMPLE_RATE, quality="HQ")
        if len(mono) == 0:
            raise AudioError(f"the audio is {len(frames)} sample{'s' if len(frames) > 1 else ''} at "
                             f"{spec.sample_rate:g} Hz: shorter than one sample at {SAMPLE_RATE} Hz")
    if spec.normalize == "peak":
        peak = float(np.abs(mono).max())
        if peak > 0:
            mono = mono / np.float32(peak)
    return mono


def _clipping_warning(frames: np.ndarray, peak: float) -> str:
    """What a client should hear about samples beyond [-1, 1]: CLAP clips them (laion-clap quantises to int16),
    so unscaled integers or boosted audio would be embedded as something else without notice."""
    beyond = int(np.count_nonzero((frames > 1.0) | (frames < -1.0)))
    hint = (" (they look like integer PCM: send samples / 32768 as float32)" if peak >= 256
            else "; send float32 in [-1, 1], or normalize=peak")
    return (f"{beyond} of {frames.size} samples ({beyond / frames.size:.1%}) were beyond [-1, 1] "
            f"(peak {peak:.3g}) and were clipped{hint}")


def repeat_pad(clip: np.ndarray, length: int = WINDOW_SAMPLES) -> np.ndarray:
    """laion-clap's ``repeatpad``: whole repeats of the clip, then zeros."""
    out = np.zeros(length, dtype=np.float32)
    repeats = length // len(clip)
    out[: repeats * len(clip)] = np.tile(clip, repeats)
    return out


def window_starts(n: int, mode: str = "mean", length: int = WINDOW_SAMPLES) -> list[int]:
    """Start offsets of the windows taken from a clip of ``n`` > ``length`` samples."""
    if mode == "head":
        return [0]
    if mode == "center":
        return [(n - length) // 2]
    starts = list(range(0, n - length + 1, length))
    if starts[-1] + length < n:
        starts.append(n - length)  # end-aligned last window: no padding, no sample left out
    return starts


def windows(clip: np.ndarray, mode: str = "mean") -> np.ndarray:
    """(k, 480000) float32 model input for one 48 kHz clip."""
    if len(clip) <= WINDOW_SAMPLES:
        return repeat_pad(clip)[None]
    return np.stack([clip[s : s + WINDOW_SAMPLES] for s in window_starts(len(clip), mode)])
