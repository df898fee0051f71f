"""The Python API: the server's pipeline, called directly.

:class:`CLAPExtractor` runs the same code as the server - :func:`audio.prepare`,
:func:`audio.windows` and :class:`~clap_ws.inference.Inference` - without a
socket or a queue, so an embedding from the API equals the server's for the
same input and model.
"""

from __future__ import annotations

import os

import numpy as np

from .audio import AudioSpec, check_rate, prepare, windows
from .errors import AudioError
from .inference import AudioJob, Inference, TextJob
from .model.clap import ClapModel
from .model.weights import load_model
from .similarity import cosine_matrix


class CLAPExtractor:
    """Embed audio (any rate, mono or interleaved) and text with one resident model.

    Give ``checkpoint_path`` (a LAION ``.pt`` or a transformers folder; or set
    ``CLAP_CHECKPOINT_PATH``, or keep the default checkpoint in the cache), or
    ``repo_id="laion/larger_clap_general"`` for a model in the local Hugging
    Face cache, or ``untrained=True`` for random weights, or a ready ``model``.
    """

    def __init__(self, checkpoint_path: str | os.PathLike | None = None, device: str | None = None, *,
                 precision: str = "auto", untrained: bool = False, seed: int = 0,
                 long_clip: str = "mean", max_seconds: float = float("inf"),
                 model: ClapModel | None = None, **model_options):
        self.model = model or load_model(checkpoint_path, untrained=untrained, seed=seed, device=device,
                                         precision=precision, **model_options)
        self.long_clip = long_clip
        self.max_seconds = max_seconds
        self._inference = Inference(self.model)

    def _run(self, job):
        (result,) = self._inference([job])
        if isinstance(result, Exception):
            raise result
        return result.embeddings

    def extract_batch(self, audios, sample_rate: float = 48_000, channels: int = 1,
                      normalize: str = "none") -> np.ndarray:
        """(N, 512) unit-norm embeddings of N clips (float arrays, interleaved if multi-channel)."""
        spec = AudioSpec(sample_rate, channels, normalize, self.long_clip)
        check_rate(sample_rate)
        clips = []
        for audio in audios:
            samples = np.ascontiguousarray(audio, dtype=np.float32).reshape(-1)
            if len(samples) % channels:
                raise AudioError(f"{len(samples)} samples do not divide into {channels} interleaved channels")
            frames = samples.reshape(-1, channels)
            clips.append(windows(prepare(frames, spec, self.max_seconds), spec.long_clip))
        return self._run(AudioJob(clips))

    def extract_embedding(self, audio, sample_rate: float = 48_000, channels: int = 1,
                          normalize: str = "none") -> np.ndarray:
        """(512,) unit-norm embedding of one clip."""
        return self.extract_batch([audio], sample_rate, channels, normalize)[0]

    def extract_text(self, texts: list[str] | str) -> np.ndarray:
        """(N, 512) unit-norm text embeddings in the same space."""
        return self._run(TextJob([texts] if isinstance(texts, str) else list(texts)))

    @staticmethod
    def compute_similarity(a, b) -> float:
        """Cosine similarity of two embeddings (not clipped: it ranges over [-1, 1]).

        The server's ``similarity`` and ``reference_similarity`` use the same function.
        """
        return float(cosine_matrix(np.ravel(a), np.ravel(b))[0, 0])
