"""Nearest-neighbour search over embeddings; needs no model and no server.

* :mod:`~clap_ws.search.scan` - exact top-k: int8 pre-scans bound every score, float32 decides;
* :mod:`~clap_ws.search.index` - flat (exact) or HNSW (FAISS), behind one interface;
* :mod:`~clap_ws.search.library` - a library file: embeddings, item metadata, an index;
* :mod:`~clap_ws.search.archive` - run archives that grow while a server runs, and novelty;
* :mod:`~clap_ws.search.storage` - one-file ``.npz`` storage, replaced atomically.
"""
