"""The client's exceptions: one base carrying the protocol's error code, and the two that are not the server's."""

from __future__ import annotations

import builtins
from typing import Any


class ClapError(Exception):
    """An error reply from the server (``code`` is PROTOCOL.md's error code), or a client-side failure."""

    def __init__(self, message: str, code: str = "error", request_id: Any = None):
        super().__init__(message)
        self.message, self.code, self.request_id = message, code, request_id

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TimeoutError(ClapError, builtins.TimeoutError):  # noqa: A001 - the same name as the builtin it extends
    """No reply within the call's timeout. The connection stays usable; the late reply is discarded."""

    def __init__(self, message: str, request_id: Any = None):
        super().__init__(message, "timeout", request_id)


class ConnectionError(ClapError, builtins.ConnectionError):  # noqa: A001
    """The connection could not be opened, or was lost before the reply came."""

    def __init__(self, message: str, code: str = "connection_lost", request_id: Any = None):
        super().__init__(message, code, request_id)
