"""The server's behaviour-descriptor projection: the one installed, fits in the background, and persistence.

A fit (``projection_fit``) runs on a thread of its own with torch serial on
it, so the model's worker keeps its cores and no embed reply waits for a fit;
the new projection replaces the old one in one assignment on the event loop
and its version goes up by one. With ``--archive-dir`` it is saved as
``projections/current.npz`` there and loaded again at start. One fit at a
time: another one meanwhile is ``busy``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from .errors import Busy, ClapError, ErrorCode
from .projection import Projection
from .projection.fit import FitOptions, check, fit
from .search.scan import single_threaded

_log = logging.getLogger(__name__)
HOW = ('no projection is installed: send {"op": "projection_fit", "archive": NAME} to fit one on an archive, or '
       'start the server with --projection FILE (clap-ws projection fit)')


class Descriptors:
    """Holds the installed :class:`~clap_ws.projection.Projection` (or none) and fits new ones."""

    def __init__(self, projection: Projection | None = None, directory: str | Path | None = None):
        self.directory = Path(directory) / "projections" if directory else None
        self.projection = projection
        self.version = 1 if projection is not None else 0
        if projection is None and self.directory and (self.directory / "current.npz").is_file():
            try:
                self.projection = Projection.load(self.directory / "current.npz")
                self.version = int(self.projection.meta.get("version", 1))
                _log.info("projection version %d reloaded from %s", self.version, self.directory / "current.npz")
            except Exception as exc:  # a damaged file must not stop the server
                _log.error("the saved projection cannot be loaded (%s); starting without one", exc)
        self.fitting: dict | None = None
        self.last_error: str | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="clap-fit", initializer=single_threaded)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)

    def apply(self, embeddings: np.ndarray) -> tuple[list | None, int | None]:
        """(descriptors per row, the version that made them), or (None, None) without a projection."""
        projection = self.projection  # one read: a fit installing meanwhile cannot split a reply
        if projection is None:
            return None, None
        return projection(embeddings).tolist(), self.version

    def info(self) -> dict:
        installed = None if self.projection is None else {**self.projection.describe(), "version": self.version}
        return {"installed": installed, "fitting": self.fitting, "last_error": self.last_error,
                **({"how": HOW} if self.projection is None else {})}

    def start_fit(self, vectors: np.ndarray, ids: list, request: Any, archive: str) -> dict:
        """Check ``request`` against the archive's ``vectors``/``ids`` and start fitting; what the reply says.

        Raises ``busy`` while a fit runs and ``bad_request`` for unusable options or triplets naming unknown
        ids, so nothing is installed and the old projection keeps serving.
        """
        if self.fitting is not None:
            raise Busy(f"a projection fit on {self.fitting['archive']!r} is running; try again when "
                       "projection_info says it is done")
        options = FitOptions(dims=request.dims, method=request.method, hidden=tuple(request.hidden),
                             epochs=request.epochs, seed=request.seed,
                             extra={"archive": archive, "source": f"archive {archive}"})
        check(options, len(vectors))
        human = self._rows([(t.anchor, t.positive, t.negative) for t in request.triplets], ids)
        self.fitting = {"archive": archive, "items": len(vectors), "method": request.method, "dims": request.dims,
                        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._pool, fit, vectors, options, human)
        future.add_done_callback(self._fitted)
        return {**self.fitting, "version": self.version, "next_version": self.version + 1}

    @staticmethod
    def _rows(triplets, ids: list) -> np.ndarray:
        if not triplets:
            return np.zeros((0, 3), int)
        where = {orjson.dumps(item): row for row, item in enumerate(ids)}
        rows, unknown = [], []
        for triplet in triplets:
            found = [where.get(orjson.dumps(item)) for item in triplet]
            unknown += [item for item, row in zip(triplet, found) if row is None]
            rows.append(found)
        if unknown:
            raise ClapError(f"{len(unknown)} triplet id(s) are not in the archive, e.g. "
                            f"{', '.join(orjson.dumps(u).decode() for u in unknown[:3])}", code=ErrorCode.BAD_REQUEST)
        return np.array(rows, int)

    def _fitted(self, future: asyncio.Future) -> None:
        fitting, self.fitting = self.fitting, None
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self.last_error = f"{type(error).__name__}: {error}"
            _log.error("projection fit on %r failed: %s", fitting and fitting["archive"], self.last_error)
            return
        projection: Projection = future.result()
        self.version += 1
        projection.meta["version"] = self.version
        self.projection, self.last_error = projection, None
        figures = projection.meta["figures"]["fitted"]
        _log.info("projection version %d installed (%s, %d dims, fitted on %s in %.1f s): triplet agreement %.3f",
                  self.version, projection.meta["method"], projection.dims, projection.source,
                  projection.meta["fit_seconds"], figures["triplet_agreement"])
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            try:
                self._pool.submit(projection.save, self.directory / "current.npz")
            except RuntimeError:  # a fit that ended while the server shut down: still saved, here
                projection.save(self.directory / "current.npz")
