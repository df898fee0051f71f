"""clap-ws: one resident LAION-CLAP model served over WebSocket.

The package reads in the direction a request flows:

* :mod:`clap_ws.protocol` - frames in, typed requests out; replies out;
* :mod:`clap_ws.audio` - PCM bytes to 48 kHz mono, then 10-s windows;
* :mod:`clap_ws.batching` - one bounded queue, one worker thread;
* :mod:`clap_ws.inference` - jobs and the batch handler;
* :mod:`clap_ws.model` - the network: weights, device, precision, forwards;
* :mod:`clap_ws.service` - what each op does: similarity, libraries, archives, descriptors;
* :mod:`clap_ws.server` - the asyncio WebSocket I/O around the service;

beside them :mod:`clap_ws.search` (exact and HNSW search, libraries, archives),
:mod:`clap_ws.build` (``library build``), :mod:`clap_ws.extractor` (the Python
API), :mod:`clap_ws.cli`, and the shared :mod:`clap_ws.constants`,
:mod:`clap_ws.errors` and :mod:`clap_ws.cpu`. ``docs/architecture.md`` says why.

Importing the package touches no network and loads no model.
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import clap_ws` light: torch loads on first use
    if name == "CLAPExtractor":
        from .extractor import CLAPExtractor

        return CLAPExtractor
    raise AttributeError(f"module 'clap_ws' has no attribute {name!r}")


__all__ = ["CLAPExtractor", "__version__"]
