"""``--engine auto``: measure the engines this machine can run on the loaded model, serve with the fastest.

Which engine is fastest depends on the CPU (OpenVINO was far faster than
torch on an Intel AMX Xeon and gained nothing on an AMD EPYC; figures in
``docs/performance.md``), so it is timed here, never assumed. :func:`choose_engine` takes the model built in
fp32 with torch (its network not yet cast), computes the reference
embeddings of a few probe windows, builds each candidate in the target
precision over the same weights, checks its embeddings against the
reference (:func:`clap_ws.tolerance.engine_min_cosine`), times it in
alternating rounds and keeps the fastest. Torch is kept unless another
engine takes at most :data:`MARGIN` of its time: OpenVINO keeps its own
weights per compiled shape and shares the cores with torch's threads inside
a server, so a small gain alone was none end to end (``docs/performance.md``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..constants import WINDOW_SAMPLES
from ..errors import ModelError
from ..tolerance import disagreement, engine_min_cosine

MARGIN = 0.90  # another engine must take at most this share of torch's time per window (see the docstring)
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    """What ``--engine auto`` timed and chose; in ``info`` and the start-up log."""

    chosen: str
    ms_per_window: dict[str, float] = field(default_factory=dict)  # median per engine, in the target precision
    cosine: dict[str, float] = field(default_factory=dict)  # worst probe cosine to torch fp32
    left_out: dict[str, str] = field(default_factory=dict)  # engine -> why it was not measured or not kept
    seconds: float = 0.0  # what choosing cost at start

    def describe(self) -> dict:
        return {"chosen": self.chosen, "ms_per_window": {k: round(v, 1) for k, v in self.ms_per_window.items()},
                "cosine_to_torch_fp32": {k: round(v, 6) for k, v in self.cosine.items()},
                "left_out": self.left_out, "seconds": round(self.seconds, 1)}

    def summary(self) -> str:
        times = ", ".join(f"{k} {v:.1f} ms" for k, v in self.ms_per_window.items())
        out = ", ".join(f"{k}: {v}" for k, v in self.left_out.items())
        return f"{self.chosen} (per window: {times}{'; not used: ' + out if out else ''})"


def probe_windows(count: int) -> np.ndarray:
    """``count`` fixed 10-s windows (noise, tones, a chirp): the same probe on every start and machine."""
    rng = np.random.default_rng(20261207)
    t = np.arange(WINDOW_SAMPLES, dtype=np.float64) / 48_000
    kinds = [0.3 * rng.standard_normal(WINDOW_SAMPLES), 0.5 * np.sin(2 * np.pi * 440 * t),
             0.5 * np.sin(2 * np.pi * (100 + 400 * t) * t), 0.2 * np.sign(np.sin(2 * np.pi * 110 * t))]
    return np.stack([kinds[i % len(kinds)] for i in range(count)]).astype(np.float32)


def choose_engine(reference, precision: str, rounds: int = 5):
    """The fastest correct engine for ``reference`` (a torch fp32 model whose network is not cast yet), built
    in ``precision``; its ``engine_choice`` says what was timed. The reference is spent: building a
    reduced-precision candidate casts the shared network."""
    started = time.perf_counter()
    probe = probe_windows(reference.chunk)
    truth = reference.embed_windows(probe)
    left_out: dict[str, str] = {}
    built = {}
    for name in ("openvino", "torch"):  # OpenVINO first: it exports from the fp32 weights, before any cast
        try:  # the model's own checks say what an engine cannot run (a GPU, fusion, --compile, not installed)
            built[name] = dataclasses.replace(reference, engine=name, precision=precision, pack=True)
        except ModelError as exc:
            left_out[name] = str(exc)
            _log.info("engine %s left out: %s", name, left_out[name])
        except Exception as exc:  # an engine that fails to build here is left out, once, and torch serves
            left_out[name] = f"failed to build: {str(exc).splitlines()[0]}"
            _log.warning("engine %s left out: %s", name, left_out[name])
    cosine: dict[str, float] = {}
    times: dict[str, list[float]] = {name: [] for name in built}
    for name, model in built.items():  # this first call is each one's warm-up; OpenVINO compiles this shape only
        cosine[name] = disagreement(model.embed_windows(probe), truth)[1]
        if cosine[name] < engine_min_cosine(precision):
            left_out[name] = f"embeddings off: cosine {cosine[name]:.6f} to torch fp32"
    for _ in range(rounds):  # alternating, so drift on a shared host hits every engine alike
        for name, model in built.items():
            begun = time.perf_counter()
            model.embed_windows(probe)
            times[name].append((time.perf_counter() - begun) * 1000 / len(probe))
    ms = {name: float(np.median(t)) for name, t in times.items()}
    others = [name for name in ms if name != "torch" and name not in left_out]
    best = min(others, key=ms.__getitem__, default=None)
    chosen = best if best is not None and ms[best] <= MARGIN * ms["torch"] else "torch"
    for name in others:
        if name != chosen:
            left_out[name] = f"not {1 / MARGIN - 1:.0%} faster than torch here" if name == best else "slower here"
    model = built.pop(chosen)
    built.clear()  # the engines not kept, and what they compiled
    _return_freed_heap()
    model.engine_choice = EngineChoice(chosen, ms, cosine, left_out, time.perf_counter() - started)
    _log.info("engine auto chose %s", model.engine_choice.summary())  # once, for serve, build, evaluate
    return model


def _return_freed_heap() -> None:
    """Give the heap the engines not kept freed back to the system (glibc keeps it for reuse otherwise, so a
    server that timed OpenVINO and chose torch would hold about 130 MB more for nothing); elsewhere a no-op."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
