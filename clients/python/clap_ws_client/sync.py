"""ClapClient: the same calls as AsyncClapClient, blocking, for loops, scripts and notebooks.

It runs an :class:`~clap_ws_client.client.AsyncClapClient` on an event loop of
its own in a background thread, so it works where an event loop already runs
(Jupyter) and from several threads at once (calls from different threads are
pipelined on the one connection).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .client import AsyncClapClient, Embedding
from .pool import AsyncClapPool


class ClapClient:
    """``with ClapClient(url) as client: client.embed(audio, 44100)``; arguments as :class:`AsyncClapClient`."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, reply: str = "binary",
                 **options: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="clap-ws-client", daemon=True)
        self._thread.start()
        self._client: Any = self._run(self._make(url, token, timeout, reply, options))

    @staticmethod
    async def _make(url, token, timeout, reply, options) -> AsyncClapClient:
        return AsyncClapClient(url, token, timeout, reply, **options)  # its semaphore belongs to this loop

    def _run(self, coroutine) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> ClapClient:
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def pending(self) -> int:
        return self._client.pending

    @property
    def model(self) -> str | None:
        """The model the server named when this client connected (``X-Clap-Model``), or None before that."""
        return self._client.model

    def connect(self) -> None:
        self._run(self._client.connect())

    def close(self) -> None:
        """Close the connection and stop the client's thread."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def request(self, message: Any, parse: Any = lambda r: r, **kw: Any) -> Any:
        return self._run(self._client.request(message, parse, **kw))

    def embed(self, audio: Any, sample_rate: float | None = None, **extras: Any) -> Embedding:
        return self._run(self._client.embed(audio, sample_rate, **extras))

    def embed_batch(self, audios: Sequence[Any], sample_rate: float | None = None, **extras: Any) -> np.ndarray:
        return self._run(self._client.embed_batch(audios, sample_rate, **extras))

    def embed_batch_items(self, audios: Sequence[Any], sample_rate: float | None = None,
                          **extras: Any) -> list[Embedding]:
        return self._run(self._client.embed_batch_items(audios, sample_rate, **extras))

    def embed_text(self, texts: Sequence[str] | str, **kw: Any) -> np.ndarray:
        return self._run(self._client.embed_text(texts, **kw))

    def similarity(self, audio: Any, prompts: Sequence[str], sample_rate: float | None = None,
                   **extras: Any) -> dict[str, float]:
        return self._run(self._client.similarity(audio, prompts, sample_rate, **extras))

    def search(self, text: str | None = None, audio: Any = None, embedding: Any = None, **options: Any) -> Any:
        return self._run(self._client.search(text, audio, embedding, **options))

    def libraries(self, **kw: Any) -> list[dict]:
        return self._run(self._client.libraries(**kw))

    def archive_add(self, archive: str, items: Any, **kw: Any) -> dict:
        return self._run(self._client.archive_add(archive, items, **kw))

    def novelty(self, archive: str, items: Any, **kw: Any) -> np.ndarray:
        return self._run(self._client.novelty(archive, items, **kw))

    def archive_search(self, archive: str, items: Any, **kw: Any) -> list[list[dict]]:
        return self._run(self._client.archive_search(archive, items, **kw))

    def archive_info(self, archive: str | None = None, **kw: Any) -> dict:
        return self._run(self._client.archive_info(archive, **kw))

    def archive_drop(self, archive: str, **kw: Any) -> bool:
        return self._run(self._client.archive_drop(archive, **kw))

    def fit_projection(self, archive: str, **options: Any) -> dict:
        return self._run(self._client.fit_projection(archive, **options))

    def projection_info(self, **kw: Any) -> dict:
        return self._run(self._client.projection_info(**kw))

    def info(self, **kw: Any) -> Any:
        return self._run(self._client.info(**kw))


class ClapPool(ClapClient):
    """:class:`~clap_ws_client.pool.AsyncClapPool`, blocking: ``with ClapPool([url1, url2]) as pool: ...``."""

    def __init__(self, urls: Sequence[str], **options: Any):
        super().__init__(urls, **options)  # type: ignore[arg-type]

    @staticmethod
    async def _make(urls, token, timeout, reply, options) -> AsyncClapPool:  # type: ignore[override]
        return AsyncClapPool(urls, token=token, timeout=timeout, reply=reply, **options)

    def request(self, message: Any, parse: Any = lambda r: r, **kw: Any) -> Any:
        raise TypeError("a pool has no raw request(): call a client of pool.clients")
