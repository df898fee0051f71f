"""What a running server is and knows of itself: its options, its counters, and the one description of it.

``info``, ``GET /health``, ``GET /metrics``, ``/api/info`` and the page's
server panel all read :class:`ServerState` (through
:meth:`~clap_ws.service.Service.describe`), so they cannot disagree, and no
part calls back up into :class:`~clap_ws.server.ClapServer` to learn it.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from . import __version__


@dataclass(frozen=True)
class ServerConfig:
    """Every server option; the CLI maps its flags onto these one to one."""

    host: str = "127.0.0.1"
    port: int = 32051
    sample_rate: float = 48_000  # for binary frames without ?sample_rate=
    max_seconds: float = 60.0
    max_batch: int = 32
    max_wait_ms: float = 0.0  # batches still form while the model is busy; see batching.py
    max_batch_ms: float = 100.0  # a batch holds about this much model time, or one turn of every waiting client
    max_queue: int = 1024
    max_items: int = 1024  # buffers, embeddings, texts or prompts per request
    max_frame_mb: float = 128.0
    max_pipeline: int = 64  # unanswered requests per connection before reading pauses
    max_pending_mb: float = 64.0  # bytes of finished, unsent replies per connection before reading pauses
    max_connections: int = 1024
    ping_interval: float = 20.0
    ping_timeout: float = 60.0
    shutdown_timeout: float = 30.0
    warm_up: bool = True  # run one window through the model before listening
    token: str | None = None  # required from clients (Authorization: Bearer, or ?token=) when set
    allowed_origins: tuple[str, ...] = ()  # browser Origins allowed besides the server's own (clients without one: any)
    text_cache: int = 4096  # prompt embeddings kept (LRU)
    audio_cache: int = 2048  # sound embeddings kept by content (LRU, ~2 KB each; 0: off)
    archive_flush_s: float = 5.0  # how often changed archives are written (with --archive-dir)
    library_poll_s: float = 2.0  # how often library files are checked for a rebuild (0: never)
    metrics_token: bool = False  # whether GET /metrics needs --token (default: open, like /health)


class RecentRequests:
    """Requests per second and p50/p95 end-to-end time over the last ``window`` seconds (for ``info`` and the
    page's panel), in fixed numpy buffers: no Python object per request (the soak test counts them)."""

    def __init__(self, window: int = 60, samples: int = 4096):
        self.window = window
        self._times = np.full(samples, -np.inf)  # a ring of the latest samples (their clock, their seconds)
        self._values = np.zeros(samples)
        self._next = 0
        self._counts = np.zeros(window, np.int64)  # requests per whole second, by second modulo window
        self._stamps = np.full(window, -1, np.int64)

    def add(self, seconds: float) -> None:
        now = time.monotonic()
        slot = self._next % len(self._times)
        self._times[slot], self._values[slot] = now, seconds
        self._next += 1
        second = int(now)
        bucket = second % self.window
        if self._stamps[bucket] != second:
            self._stamps[bucket], self._counts[bucket] = second, 0
        self._counts[bucket] += 1

    def describe(self) -> dict:
        now = time.monotonic()
        requests = int(self._counts[self._stamps > int(now) - self.window].sum())
        recent = self._values[self._times > now - self.window] * 1000
        p50, p95 = np.percentile(recent, [50, 95]).tolist() if len(recent) else (None, None)
        return {"window_s": self.window, "requests": requests, "per_s": round(requests / self.window, 3),
                "p50_ms": p50, "p95_ms": p95}


@dataclass
class ServerState:
    """The server's run-time state; :class:`~clap_ws.server.ClapServer` keeps it current."""

    config: ServerConfig = field(default_factory=ServerConfig)
    started: float = field(default_factory=time.time)
    connections: int = 0
    draining: bool = False
    worker_restarts: int = 0
    recent: RecentRequests = field(default_factory=RecentRequests)

    def describe(self) -> dict:
        """The server's part of ``info`` (the model's and the service's parts come from the service)."""
        return {
            "version": __version__,
            "sample_rate": self.config.sample_rate,
            "connections": self.connections,
            "worker_restarts": self.worker_restarts,
            "recent": self.recent.describe(),
            "uptime_s": round(time.time() - self.started, 3),
            "config": {**asdict(self.config), "token": "***" if self.config.token else None},
        }
