"""Every error code, and the exceptions that carry one.

Every failure a client can cause or observe is a :class:`ClapError` with a
stable, machine-readable ``code`` from :class:`ErrorCode` (the table in
PROTOCOL.md lists the same codes, checked by a test) and a message meant for
a person. The server turns any of them into the one error reply shape,
``{"status": "ERROR", "error": {"code", "message"}, "id"}``; the Python API
raises them as they are. Codes are enumeration members, so a typo is an
``AttributeError``, not a silently new code.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(str, enum.Enum):
    """The protocol's error codes: a ``str`` each, written to the wire as its value."""

    BAD_JSON = "bad_json"
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    BAD_BASE64 = "bad_base64"
    BAD_AUDIO = "bad_audio"
    BAD_SAMPLE_RATE = "bad_sample_rate"
    TOO_LONG = "too_long"
    TOO_MANY_ITEMS = "too_many_items"
    TEXT_UNAVAILABLE = "text_unavailable"
    NO_LIBRARY = "no_library"
    UNKNOWN_LIBRARY = "unknown_library"
    UNKNOWN_TAG = "unknown_tag"
    UNKNOWN_ARCHIVE = "unknown_archive"
    K_TOO_LARGE = "k_too_large"
    ARCHIVE_ERROR = "archive_error"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    MODEL_ERROR = "model_error"
    INTERNAL = "internal"

    def __str__(self) -> str:
        return self.value


class ClapError(Exception):
    """Base class: something the caller can be told about, with a code."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: ErrorCode | None = None, request_id: Any = None):
        super().__init__(message)
        if code is not None:
            self.code = ErrorCode(code)
        self.request_id = request_id  # the request's "id", echoed in the error reply

    @property
    def message(self) -> str:
        return str(self)


class RequestError(ClapError):
    """The request is malformed: bad JSON, wrong types, unknown fields or ops."""

    code = ErrorCode.BAD_REQUEST


class AudioError(ClapError):
    """The audio in a request cannot be used (empty, NaN, wrong length...)."""

    code = ErrorCode.BAD_AUDIO


class Busy(ClapError):
    """The inference queue is full; try again later."""

    code = ErrorCode.BUSY


class TextUnavailable(ClapError):
    """Text features need tokenizer files that are not present."""

    code = ErrorCode.TEXT_UNAVAILABLE


class ShuttingDown(ClapError):
    """The server is draining before exit and takes no new work."""

    code = ErrorCode.SHUTTING_DOWN


class ModelError(ClapError):
    """A checkpoint or model option cannot be used; raised at start-up."""

    code = ErrorCode.MODEL_ERROR
