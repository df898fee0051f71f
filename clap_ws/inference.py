"""Jobs for the model and the batch handler that runs them.

A job is what one request asks of the model: one or more audio clips (already
cut into 10-s windows by :mod:`clap_ws.audio`), or some texts.
:class:`Inference` is the handler the batcher calls with a list of jobs: it
runs every window of every audio job through the model, averages the raw
outputs of each clip's windows, and L2-normalises; then it embeds the texts
of all text jobs in one call (a prompt alone is bound by reading the text
tower's weights, so several prompts in one call cost little more than one).
The Python API (:class:`clap_ws.CLAPExtractor`) calls the same handler
directly, so the server and the API cannot drift apart. How many windows or
texts go through the network at once is the model's business (its
``chunk``), because the best number depends on the device.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .model.clap import ClapModel
from .similarity import unit


@dataclass
class AudioJob:
    """Clips of one request; each entry is a (k, 480000) window array."""

    clips: list[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class TextJob:
    texts: list[str]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    """Unit-norm embeddings (one row per clip or text) and where the time went."""

    embeddings: np.ndarray
    queue_ms: float
    model_ms: float


_PENDING = Exception("no result")  # a placeholder every job replaces


class Inference:
    """Batch handler: ``list[AudioJob | TextJob] -> list[Result | Exception]``."""

    def __init__(self, model: ClapModel):
        self.model = model
        self.text_calls = 0  # batches whose texts went through the model (in calls of up to 64 texts)

    def __call__(self, jobs: Sequence[AudioJob | TextJob]) -> list[Result | Exception]:
        """One result per job, in order: a :class:`Result`, or the exception that failed a text job.

        An exception from the audio side propagates and fails the whole batch
        (the batcher answers each of its requests with it); a text failure
        (no tokenizer) fails the text jobs only.
        """
        started = time.perf_counter()
        results: list[Result | Exception] = [_PENDING] * len(jobs)
        audio = [(i, job) for i, job in enumerate(jobs) if isinstance(job, AudioJob)]
        if audio:
            clips = self._embed_audio([job for _, job in audio])
            model_ms = (time.perf_counter() - started) * 1000
            for (i, job), emb in zip(audio, clips):
                results[i] = Result(emb, (started - job.enqueued) * 1000, model_ms)
        texts = [(i, job) for i, job in enumerate(jobs) if isinstance(job, TextJob)]
        if texts:
            text_started = time.perf_counter()
            try:  # one model call for every text in the batch
                vectors = self.model.embed_text([text for _, job in texts for text in job.texts])
            except Exception as exc:  # e.g. no tokenizer: it fails every text job, and no audio job
                for i, _ in texts:
                    results[i] = exc
            else:
                self.text_calls += 1
                model_ms = (time.perf_counter() - text_started) * 1000
                start = 0
                for i, text_job in texts:
                    count = len(text_job.texts)
                    results[i] = Result(vectors[start : start + count], (text_started - text_job.enqueued) * 1000,
                                        model_ms)
                    start += count
        return results

    def _embed_audio(self, jobs: list[AudioJob]) -> list[np.ndarray]:
        clips = [clip for job in jobs for clip in job.clips]
        counts = [len(clip) for clip in clips]
        all_windows = clips[0] if len(clips) == 1 else np.concatenate(clips)
        raw = self.model.embed_windows(all_windows)
        # mean of each clip's raw window outputs, then unit length
        bounds = np.cumsum([0] + counts)
        per_clip = unit(np.stack([raw[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))
        out, start = [], 0
        for job in jobs:
            out.append(per_clip[start : start + len(job.clips)])
            start += len(job.clips)
        return out
