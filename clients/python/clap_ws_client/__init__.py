"""clap-ws-client: CLAP embeddings of sounds and texts from a running clap-ws server.

``ClapClient`` blocks (scripts, loops, notebooks); ``AsyncClapClient`` is the
same on asyncio. Both pipeline many calls on one connection, take numpy
arrays in and give numpy arrays out, and raise :class:`ClapError` (with the
protocol's ``code``), :class:`TimeoutError` or :class:`ConnectionError`.
Needs websockets and numpy only: no torch, no model in your process.
"""

from .client import AsyncClapClient, Embedding
from .errors import ClapError, ConnectionError, TimeoutError
from .pool import AsyncClapPool
from .sync import ClapClient, ClapPool

__all__ = ["AsyncClapClient", "AsyncClapPool", "ClapClient", "ClapError", "ClapPool", "ConnectionError", "Embedding",
           "TimeoutError"]
__version__ = "0.1.0"
