"""The audio encoder compiled by OpenVINO: the other engine for CPUs (``--engine openvino``, or chosen by auto).

Why it exists: on some CPUs OpenVINO's CPU plugin runs HTSAT's transformer in
less time than torch's eager kernels (on Intel AMX, and in fp32, what CPUs
without native bf16 run), on others not. It costs memory, since each compiled
call shape keeps its own weights and buffers, so ``--engine auto``
(:mod:`clap_ws.model.engine_choice`) keeps it only where it measures a clear
gain. ``benchmarks/engines.py``, ``benchmarks/engine_auto.py`` and
``benchmarks/ab.py`` measure it; figures are in ``docs/performance.md``.

How it is shaped:

* The spectrogram front end stays in torch: OpenVINO runs its exported STFT,
  but several times slower than torch's FFT (``benchmarks/engine_parts.py``).
  Everything after it (:class:`~clap_ws.model.towers.AudioBody`: ``bn0``,
  the time-frequency image, the Swin transformer with clap-ws's inference
  forwards, the projection) is exported once with ``torch.onnx`` and compiled
  by OpenVINO per call shape (1, 2, 4 ... windows, up to the model's chunk),
  each on its first call: static shapes, since a dynamic window count was
  slower per window, and on demand, so that ``--engine auto`` times one shape
  without paying every shape's memory.
* ``torch.onnx`` rather than OpenVINO's own converter (``ov.convert_model``),
  because that one sends usage telemetry unless a consent file says no, and
  clap-ws does not touch the network unless asked.
* OpenVINO gets the model's precision (bf16 or fp32), the latency hint and
  as many threads as torch uses. Its embeddings stay within cosine 0.999 of
  torch's fp32 (tested).
* Non-fusion checkpoints only (the fusion branch takes data-dependent paths),
  CPU only, and not together with ``--compile``.
"""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import io
import logging
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError

_log = logging.getLogger(__name__)
_PRECISION = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_NEEDS = ("openvino", "onnx", "onnxscript")  # onnx and onnxscript: torch.onnx's exporter


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here (a package missing), or None."""
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    return f"not installed ({', '.join(missing)}: pip install 'clap-ws[openvino]')" if missing else None


def openvino_version() -> str | None:
    """The installed OpenVINO's version (``2026.4.1``), or None."""
    if importlib.util.find_spec("openvino") is None:
        return None
    import openvino

    return openvino.__version__.split("-")[0]


class OpenVinoAudio:
    """An :class:`~clap_ws.model.towers.AudioBody` compiled by OpenVINO per power-of-two call size to ``chunk``.

    ``body`` must be in eval mode, fp32 and unpacked (:meth:`AudioBody.of
    <clap_ws.model.towers.AudioBody.of>`). Call from one thread at a time.
    """

    def __init__(self, body: torch.nn.Module, mel_shape: tuple[int, int], precision: str, chunk: int, threads: int,
                 cache: Path | None = None, key: str | None = None):
        """``cache`` (a folder) and ``key`` (what identifies ``body``'s weights) keep the export and the compiled
        code on disk, so a restart with the same model skips both."""
        missing = openvino_missing()
        if missing:
            raise ModelError(f"--engine openvino: OpenVINO is {missing}")
        import openvino

        self.version = openvino_version()
        frames, bins = mel_shape
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads,
                  "INFERENCE_PRECISION_HINT": _PRECISION[precision]}
        core = openvino.Core()
        self.calls: collections.Counter = collections.Counter()  # calls per size, for tests and curiosity
        self._requests: dict[int, object] = {}  # call size -> its compiled infer request
        self.cached = False  # whether the export came from the disk cache
        with tempfile.TemporaryDirectory(prefix="clap-ws-openvino-") as folder:
            path = Path(folder) / "audio.onnx"
            if cache is not None and key is not None:
                cache.mkdir(parents=True, exist_ok=True)
                core.set_property({"CACHE_DIR": str(cache / "compiled")})
                path, self.cached = cache / f"{key}.onnx", (cache / f"{key}.onnx").is_file()
            if not self.cached:
                _log.info("exporting the audio encoder for OpenVINO%s (about 15 s)",
                          f", once: kept in {cache}" if cache is not None and key is not None else "")
                part = path.with_name(f"{path.stem}.{os.getpid()}.part")  # processes starting at once
                export_onnx(body, torch.zeros(2, 1, frames, bins), part)
                part.replace(path)  # atomic: a process killed mid-export leaves no half file
            self._exported = core.read_model(str(path))
        self._core, self._config, self._shape = core, config, (1, frames, bins)
        self._sizes = [1 << i for i in range(chunk.bit_length())]  # 1, 2, 4 ... up to chunk

    @property
    def sizes(self) -> list[int]:
        """The call sizes (windows) it takes; each is compiled on its first call (or by :meth:`compile`)."""
        return list(self._sizes)

    @property
    def compiled(self) -> list[int]:
        """The call sizes compiled so far."""
        return sorted(self._requests)

    def compile(self, size: int):
        """The inference request for calls of ``size`` windows, compiled on first use: static shapes compile
        to faster code, and compiling on demand keeps an engine that is only being timed (``--engine auto``)
        to one shape's memory."""
        if size not in self._requests:
            if size not in self._sizes:
                raise ValueError(f"OpenVINO takes calls of {self._sizes} windows, not {size}")
            model = self._exported.clone()
            model.reshape([size, *self._shape])
            self._requests[size] = self._core.compile_model(model, "CPU", self._config).create_infer_request()
        return self._requests[size]

    def __call__(self, mel: torch.Tensor) -> np.ndarray:
        """Raw embeddings (N, 512) of log-mel ``mel`` (N, 1, frames, bins), N one of :attr:`sizes`."""
        request = self.compile(mel.shape[0])
        self.calls[mel.shape[0]] += 1
        return request.infer({0: mel.float().contiguous().numpy()})[0].copy()  # the output buffer is reused


def export_onnx(module: torch.nn.Module, example, path: Path, dynamic_shapes=None) -> None:
    """``module`` (fp32) as an ONNX file, quietly (``torch.onnx`` prints and warns). ``example``: a tensor or a
    tuple of them; ``dynamic_shapes``: ``torch.export``'s, by default a dynamic first axis (the window count)
    of the one input."""
    if any(p.dtype != torch.float32 for p in module.parameters()):
        raise ModelError("--engine openvino exports the network in fp32, but this one is already cast")
    if dynamic_shapes is None:
        dynamic_shapes = ({0: torch.export.Dim("windows", min=1, max=1024)},)
    # the exporter and its optimiser log hundreds of INFO lines per export ("torchvision is not installed",
    # every constant folded, every initializer merged): a server's log is for its operator
    chatty = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in chatty]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in chatty:
            logger.setLevel(logging.ERROR)
        try:
            torch.onnx.export(module, example if isinstance(example, tuple) else (example,), str(path), dynamo=True,
                              external_data=False, dynamic_shapes=dynamic_shapes, verbose=False)
        except Exception as exc:  # the exporter's errors run to pages; the first line says what failed
            raise ModelError(f"could not export {type(module).__name__} for OpenVINO: "
                             f"{str(exc).splitlines()[0]}") from exc
        finally:
            for logger, level in zip(chatty, levels):
                logger.setLevel(level)
