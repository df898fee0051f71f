"""Exceptions that carry a protocol error code.

Every failure a client can cause or observe is a :class:`ClapError` with a
stable, machine-readable ``code`` (listed in PROTOCOL.md) and a message meant
for a person. The server turns any of them into the one error reply shape,
``{"status": "ERROR", "error": {"code", "message"}, "id"}``; the Python API
raises them as they are. Codes are constants on the classes, so a typo is an
``AttributeError``, not a silently new code.
"""

from __future__ import annotations


class ClapError(Exception):
    """Base class: something the caller can be told about, with a code."""

    code = "internal"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class RequestError(ClapError):
    """The request is malformed: bad JSON, wrong types, unknown fields or ops."""

    code = "bad_request"


class AudioError(ClapError):
    """The audio in a request cannot be used (empty, NaN, wrong length...)."""

    code = "bad_audio"


class Busy(ClapError):
    """The inference queue is full; try again later."""

    code = "busy"


class TextUnavailable(ClapError):
    """Text features need tokenizer files that are not present."""

    code = "text_unavailable"


class ShuttingDown(ClapError):
    """The server is draining before exit and takes no new work."""

    code = "shutting_down"


class ModelError(ClapError):
    """A checkpoint or model option cannot be used; raised at start-up."""

    code = "model_error"
