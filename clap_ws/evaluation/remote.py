"""Text embeddings from a running clap-ws server (``clap-ws evaluate --server``), checked to be the library's model."""

from __future__ import annotations

import json

import numpy as np
from websockets.sync.client import connect

from ..errors import ClapError, ErrorCode, ModelError
from ..search.library import same_model

CHUNK = 256  # texts per embed_text request: well under any server's --max-items


class ServerTexts:
    """Callable: texts -> (n, 512) embeddings from ``url``. Raises :class:`ModelError` at construction when the
    server runs another model than ``library_model`` (embeddings from two models cannot be compared)."""

    def __init__(self, url: str, library_model: dict, token: str | None = None, timeout: float = 120):
        self.url = url.rstrip("/") + ("" if url.rstrip("/").endswith("/clap") else "/clap")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        info = self._ask([{"op": "info"}])[0]
        served = {"name": info["model"], "sha256": info["checkpoint_sha256"], "seed": info["seed"],
                  "architecture": info["architecture"]}
        if not same_model(library_model, served):
            raise ModelError(f"{url} serves {served['name']} ({served['architecture']}), but the library was built "
                             f"with {library_model.get('name')} ({library_model.get('architecture')}): their "
                             f"embeddings cannot be compared")

    def _ask(self, messages: list[dict]) -> list[dict]:
        try:
            with connect(self.url, additional_headers=self.headers, max_size=None, open_timeout=30) as ws:
                replies = []
                for message in messages:
                    ws.send(json.dumps(message))
                    reply = json.loads(ws.recv(self.timeout))
                    if reply.get("status") != "OK":
                        error = reply.get("error", {})
                        raise ClapError(f"{self.url}: {error.get('message')}",
                                        code=ErrorCode(error.get("code", "internal")))
                    replies.append(reply)
                return replies
        except OSError as exc:
            raise ModelError(f"cannot reach {self.url}: {exc}") from None

    def __call__(self, texts: list[str]) -> np.ndarray:
        chunks = [texts[i : i + CHUNK] for i in range(0, len(texts), CHUNK)]
        replies = self._ask([{"op": "embed_text", "texts": chunk} for chunk in chunks])
        return np.array([row for reply in replies for row in reply["embeddings"]], dtype=np.float32)
