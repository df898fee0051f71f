"""clap-ws: one resident LAION-CLAP model served over WebSocket.

The package reads in the direction data flows:

* :mod:`clap_ws.protocol` - frames in, typed requests out; replies out;
* :mod:`clap_ws.audio` - PCM bytes to 48 kHz mono, then 10-s windows;
* :mod:`clap_ws.batching` - one bounded queue, one worker thread;
* :mod:`clap_ws.inference` - jobs and the batch handler;
* :mod:`clap_ws.model` - laion-clap's network, weights, device, precision
  (:mod:`clap_ws.laion` imports it safely; :mod:`clap_ws.towers`,
  :mod:`clap_ws.swin` and :mod:`clap_ws.roberta` adapt it for serving;
  :mod:`clap_ws.tokenizer` finds text tokenizers, :mod:`clap_ws.weights`
  finds or fetches checkpoints);
* :mod:`clap_ws.service` - what each op does: similarity
  (:mod:`clap_ws.similarity`), libraries (:mod:`clap_ws.library`), archives
  (:mod:`clap_ws.archive`), FAISS (:mod:`clap_ws.index`), behaviour
  descriptors (:mod:`clap_ws.projection`), atomic files (:mod:`clap_ws.storage`);
* :mod:`clap_ws.server` - the asyncio WebSocket I/O around the service;
* :mod:`clap_ws.extractor` - the same pipeline as a Python API;
* :mod:`clap_ws.cli` - ``clap-ws`` / ``python -m clap_ws``;
* :mod:`clap_ws.errors` - exceptions with protocol error codes.

Importing the package touches no network and loads no model.
"""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import clap_ws` light: torch loads on first use
    if name == "CLAPExtractor":
        from .extractor import CLAPExtractor

        return CLAPExtractor
    raise AttributeError(f"module 'clap_ws' has no attribute {name!r}")


__all__ = ["CLAPExtractor", "__version__"]
