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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .constants import EMBED_DIM
from .metrics import Metrics
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


class Inference:
    """Batch handler: ``list[AudioJob | TextJob] -> list[Result | Exception]``."""

    def __init__(self, model: ClapModel, metrics: Metrics | None = None):
        self.model = model
        self.metrics = metrics
        self.text_calls = 0  # batches whose texts went through the model (in calls of up to 64 texts)
        self.audio_windows = 0  # 10-s windows that went through the model

    def __call__(self, jobs: Sequence[AudioJob | TextJob]) -> list[Result | Exception]:
        """One result per job, in order: a :class:`Result`, or the exception that failed a text job."""
        return list(self.stream(jobs))

    def stream(self, jobs: Sequence[AudioJob | TextJob]) -> Iterator[Result | Exception]:
        """The results of :meth:`__call__`, each yielded as soon as it is ready, in job order.

        Texts go first (one call for all of them); audio windows then go
        through the model ``chunk`` at a time in job order, and a job's result
        is yielded once its last window is done, so the first jobs of a big
        batch are answered before the last ones run (the batcher settles each
        at once). An exception from the audio side propagates and fails the
        jobs not yet answered; a text failure (no tokenizer) fails the text
        jobs only.
        """
        started = time.perf_counter()
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(jobs))
            for job in jobs:
                self.metrics.queue_seconds.observe(max(0.0, started - job.enqueued))
        ready: dict[int, Result | Exception] = self._texts(jobs)
        audio = [(i, job) for i, job in enumerate(jobs) if isinstance(job, AudioJob)]
        clips = [clip for _, job in audio for clip in job.clips]
        windows = clips[0] if len(clips) == 1 else np.concatenate(clips) if clips else np.zeros((0, 0), np.float32)
        raw = np.empty((len(windows), EMBED_DIM), np.float32)
        ends = np.cumsum([sum(len(clip) for clip in job.clips) for _, job in audio], dtype=int)  # past each job's rows
        step = max(1, self.model.chunk)
        following, done = 0, 0  # the next job to yield; audio jobs whose windows are all done
        for start in range(0, len(windows), step):
            stop = min(start + step, len(windows))
            raw[start:stop] = self.model.embed_windows(windows[start:stop])  # a view of the windows: no copy
            self.audio_windows += stop - start
            while done < len(audio) and ends[done] <= stop:
                i, job = audio[done]
                bounds = (ends[done - 1] if done else 0) + np.cumsum([0] + [len(clip) for clip in job.clips])
                per_clip = unit(np.stack([raw[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])]))
                ready[i] = Result(per_clip, (started - job.enqueued) * 1000, (time.perf_counter() - started) * 1000)
                done += 1
            while following < len(jobs) and following in ready:
                yield ready.pop(following)
                following += 1
        while following < len(jobs):
            yield ready.pop(following)
            following += 1
        if self.metrics is not None:
            self.metrics.model_seconds.observe(time.perf_counter() - started)

    def _texts(self, jobs: Sequence[AudioJob | TextJob]) -> dict[int, Result | Exception]:
        """The results of the text jobs, by job index: one model call for all their texts."""
        texts = [(i, job) for i, job in enumerate(jobs) if isinstance(job, TextJob)]
        if not texts:
            return {}
        started = time.perf_counter()
        try:
            vectors = self.model.embed_text([text for _, job in texts for text in job.texts])
        except Exception as exc:  # e.g. no tokenizer: it fails every text job, and no audio job
            return {i: exc for i, _ in texts}
        self.text_calls += 1
        model_ms = (time.perf_counter() - started) * 1000
        out: dict[int, Result | Exception] = {}
        start = 0
        for i, job in texts:
            out[i] = Result(vectors[start : start + len(job.texts)], (started - job.enqueued) * 1000, model_ms)
            start += len(job.texts)
        return out
