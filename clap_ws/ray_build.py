"""Library builds across a Ray cluster: actors embed, the driver plans and writes (``library build --ray``).

The driver (:func:`clap_ws.build.build`) scans, plans and stays the only
writer of the journal and the final file, exactly as in a local build;
:class:`RayEmbedder` hands it each batch's result as soon as any actor
finishes it. Each actor holds one model (a GPU each with ``gpus=1``) and
decodes, resamples and embeds its batches; files are read where they lie
(shared storage: the same path on every node) or, with ``send_bytes``, sent
by the driver. An actor that dies has its batch retried on another (and is
replaced), so a worker lost mid-build costs its batch's time, not its
files. Every actor's model identity must equal the library's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from .build import Embedded, FileTask, embed_files
from .errors import ModelError

_log = logging.getLogger(__name__)
MAX_TRIES = 3  # per batch: a batch whose actors keep dying is a bad batch, not bad luck


class EmbedWorker:
    """One model on one Ray worker process (made a Ray actor by :class:`RayEmbedder`)."""

    def __init__(self, model_options: dict, max_seconds: float):
        from .inference import Inference
        from .model.weights import load_model

        self.model = load_model(**model_options)
        self.inference = Inference(self.model)
        self.max_seconds = max_seconds

    def identity(self) -> dict:
        from .model.clap import model_identity

        return model_identity(self.model)

    def embed(self, tasks: list[FileTask], data: list[bytes] | None = None) -> Embedded:
        return embed_files(tasks, lambda: self.inference, self.max_seconds, data)

    def pid(self) -> int:
        import os

        return os.getpid()


class RayEmbedder:
    """Runs :class:`EmbedWorker` actors on a Ray cluster (``address``: ``None`` starts or joins a local one, as
    ``ray.init`` does; ``ray://host:10001`` or ``RAY_ADDRESS`` reach a real one)."""

    def __init__(self, model_options: dict, max_seconds: float, *, workers: int = 2, address: str | None = None,
                 gpus: float = 0.0, send_bytes: bool = False):
        try:
            import ray
        except ImportError:
            raise ModelError("library build --ray needs Ray: pip install 'clap-ws[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        self.model_options = dict(model_options)
        self.max_seconds = max_seconds
        self.workers_wanted = workers
        self.gpus = gpus
        self.send_bytes = send_bytes
        self._actor = ray.remote(num_cpus=1, num_gpus=gpus, max_restarts=0)(EmbedWorker)
        self.actors = [self._start() for _ in range(workers)]
        self._identity: dict | None = None
        self.retried = 0  # batches run again because their actor died
        self.busy: list = []  # actors with a batch in flight now

    def _start(self):
        return self._actor.remote(self.model_options, self.max_seconds)

    def identity(self) -> dict:
        """The workers' model identity; :class:`ModelError` if they differ (a cluster of mixed checkpoints)."""
        if self._identity is None:
            found = self.ray.get([actor.identity.remote() for actor in self.actors])
            if any(f != found[0] for f in found):
                raise ModelError(f"the Ray workers run different models: {found}")
            self._identity = found[0]
        return self._identity

    def check(self, library_model: dict) -> None:
        from .search.library import same_model

        if not same_model(library_model, self.identity()):
            raise ModelError(f"the Ray workers run {self.identity()}, the library was built with {library_model}: "
                             "their embeddings cannot be mixed")

    def run(self, batches: list[list[FileTask]]) -> Iterator[Embedded]:
        """Each batch's result as soon as it is done, in any order; a batch whose actor died runs again."""
        ray = self.ray
        queue = [(batch, 0) for batch in batches if batch]
        running: dict = {}  # future -> (batch, tries, actor)
        idle = list(self.actors)
        while queue or running:
            while queue and idle:
                batch, tries = queue.pop(0)
                actor = idle.pop(0)
                data = [Path(task.path).read_bytes() for task in batch] if self.send_bytes else None
                running[actor.embed.remote(batch, data)] = (batch, tries, actor)
            self.busy = [entry[2] for entry in running.values()]
            ready, _ = ray.wait(list(running), num_returns=1)
            batch, tries, actor = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                self.retried += 1
                if tries + 1 >= MAX_TRIES:
                    raise ModelError(f"a batch of {len(batch)} files failed on {MAX_TRIES} Ray workers: {exc}") \
                        from None
                _log.warning("a Ray worker died (%s); its %d files go to another", type(exc).__name__, len(batch))
                self.actors.remove(actor)
                replacement = self._start()
                self.actors.append(replacement)
                idle.append(replacement)
                queue.insert(0, (batch, tries + 1))
                continue
            idle.append(actor)
            yield result

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
