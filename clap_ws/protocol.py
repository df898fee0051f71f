"""The wire protocol: frames in, typed requests out; results in, reply frames out.

No I/O happens here. A WebSocket message is parsed and validated once, at the
edge, into a frozen request object (:class:`EmbedRequest` or
:class:`InfoRequest`); the server and the model trust it from then on. Every
way a message can be wrong raises a :class:`~clap_ws.errors.ClapError` whose
``code`` is documented in PROTOCOL.md, and :func:`error_reply` renders any of
them in the one error shape.

Message forms (PROTOCOL.md has the full text):

* binary frame - float32 PCM; rate, channels and options come from the URL
  query of the connection (``?sample_rate=44100``), unknown query keys ignored;
* text frame - a JSON object: ``{"audio_buffer": <base64>, "sample_rate": n}``,
  ``{"op": "embed_batch", "audio_buffers": [...]}`` or ``{"op": "info"}``;
  unknown fields are an error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Any, Literal, Union
from urllib.parse import parse_qsl

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from .audio import LONG_CLIP_MODES, NORMALIZE_MODES, AudioSpec, check_rate
from .errors import ClapError, RequestError

REPLY_FORMATS = ("json", "binary")
_QUERY_KEYS = ("sample_rate", "channels", "normalize", "long_clip", "reply")


# ---- typed requests -------------------------------------------------------
@dataclass(frozen=True)
class EmbedRequest:
    """Embed one buffer (``batch=False``) or several (``embed_batch``)."""

    buffers: list
    spec: AudioSpec
    reply: str = "json"
    id: Any = None
    batch: bool = False


@dataclass(frozen=True)
class InfoRequest:
    id: Any = None


Request = Union[EmbedRequest, InfoRequest]


@dataclass(frozen=True)
class ConnectionDefaults:
    """Options for binary frames, from the URL query and the server's defaults.

    A bad query value does not refuse the connection (probe connections must
    always open): it is kept in ``error`` and returned for each binary frame.
    """

    spec: AudioSpec = AudioSpec()
    reply: str = "json"
    error: ClapError | None = field(default=None, compare=False)


# ---- JSON message schemas (validation only) -------------------------------
Rate = StrictFloat  # a JSON number (ints accepted); strings and booleans are refused


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Any = None
    sample_rate: Rate | None = None
    channels: StrictInt | None = Field(None, ge=1, le=64)
    normalize: Literal[NORMALIZE_MODES] | None = None  # type: ignore[valid-type]
    long_clip: Literal[LONG_CLIP_MODES] | None = None  # type: ignore[valid-type]
    reply: Literal[REPLY_FORMATS] | None = None  # type: ignore[valid-type]


class _EmbedMessage(_Options):
    op: Literal["embed"] = "embed"
    audio_buffer: StrictStr


class _EmbedBatchMessage(_Options):
    op: Literal["embed_batch"]
    audio_buffers: list[StrictStr] = Field(min_length=1)


class _InfoMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    op: Literal["info"]
    id: Any = None


_SCHEMAS = {"embed": _EmbedMessage, "embed_batch": _EmbedBatchMessage, "info": _InfoMessage}


def _rejected(code: str, message: str, request_id: Any = None) -> RequestError:
    error = RequestError(message, code=code)
    error.request_id = request_id
    return error


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _b64(text: str, where: str, request_id: Any) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _rejected("bad_base64", f"{where} is not valid base64", request_id) from None


# ---- parsing ------------------------------------------------------------------
def _query_value(params: dict, key: str, convert, allowed=None):
    raw = params[key]
    try:
        value = convert(raw)
    except ValueError:
        raise ValueError(f"{key}={raw!r} is not a {convert.__name__}") from None
    if allowed is not None and value not in allowed:
        raise ValueError(f"{key}={raw!r}; expected {allowed}")
    return value


def parse_query(query: str, default_rate: float) -> ConnectionDefaults:
    """Read binary-frame options from a URL query; other keys are ignored."""
    params = {k: v for k, v in parse_qsl(query, keep_blank_values=True) if k in _QUERY_KEYS}
    options: dict[str, Any] = {"sample_rate": default_rate}
    try:
        if "sample_rate" in params:
            options["sample_rate"] = _query_value(params, "sample_rate", float)
        if "channels" in params:
            options["channels"] = _query_value(params, "channels", int, range(1, 65))
        for key, allowed in (("normalize", NORMALIZE_MODES), ("long_clip", LONG_CLIP_MODES)):
            if key in params:
                options[key] = _query_value(params, key, str, allowed)
        reply = _query_value(params, "reply", str, REPLY_FORMATS) if "reply" in params else "json"
        check_rate(options["sample_rate"])
    except ValueError as exc:
        error = RequestError(f"bad URL query parameter: {exc}")
        return ConnectionDefaults(AudioSpec(sample_rate=default_rate), "json", error)
    except ClapError as exc:
        return ConnectionDefaults(AudioSpec(sample_rate=default_rate), "json", exc)
    return ConnectionDefaults(AudioSpec(**options), reply)


def parse_binary(data: bytes, defaults: ConnectionDefaults) -> EmbedRequest:
    if defaults.error is not None:
        raise defaults.error
    return EmbedRequest([data], defaults.spec, defaults.reply)


def parse_text(text: str | bytes, defaults: ConnectionDefaults, max_items: int) -> Request:
    """Validate one JSON message into a typed request."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _rejected("bad_json", f"the message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _rejected("bad_json", f"the message must be a JSON object, not {type(data).__name__}")
    request_id = data.get("id")
    op = data.get("op", "embed")
    schema = _SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise _rejected("unknown_op", f"unknown op {op!r}; known: {', '.join(_SCHEMAS)}", request_id)
    if schema is _EmbedBatchMessage and isinstance(data.get("audio_buffers"), list) \
            and len(data["audio_buffers"]) > max_items:
        raise _rejected("too_many_items", f"audio_buffers has {len(data['audio_buffers'])} "
                        f"items; this server takes at most {max_items} per request", request_id)
    try:
        msg = schema.model_validate(data)
    except ValidationError as exc:
        raise _rejected("bad_request", _describe(exc), request_id) from None
    if isinstance(msg, _InfoMessage):
        return InfoRequest(msg.id)
    spec = AudioSpec(
        sample_rate=defaults.spec.sample_rate if msg.sample_rate is None else msg.sample_rate,
        channels=msg.channels or 1,
        normalize=msg.normalize or defaults.spec.normalize,
        long_clip=msg.long_clip or defaults.spec.long_clip,
    )
    try:
        check_rate(spec.sample_rate)
    except ClapError as exc:
        exc.request_id = request_id
        raise
    if isinstance(msg, _EmbedMessage):
        buffers = [_b64(msg.audio_buffer, "audio_buffer", request_id)]
    else:
        buffers = [_b64(b, f"audio_buffers[{i}]", request_id) for i, b in enumerate(msg.audio_buffers)]
    return EmbedRequest(buffers, spec, msg.reply or defaults.reply, msg.id, isinstance(msg, _EmbedBatchMessage))


# ---- replies --------------------------------------------------------------------
def _dumps(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def embedding_reply(request: EmbedRequest, embeddings: np.ndarray, *, model: str,
                    seconds: float, queue_ms: float, model_ms: float) -> tuple[bytes, bool]:
    """The reply frame for an embedding request, and whether it is text."""
    if request.reply == "binary":
        return np.ascontiguousarray(embeddings, dtype="<f4").tobytes(), False
    body: dict[str, Any] = {"status": "OK"}
    if request.batch:
        body["embeddings"] = embeddings
        body["count"] = len(embeddings)
    else:
        body["embedding"] = body["features"] = embeddings[0]
    body.update(type="clap", model=model, time=seconds, extraction_time_ms=seconds * 1000,
                queue_ms=queue_ms, model_ms=model_ms, id=request.id)
    return _dumps(body), True


def info_reply(info: dict, request_id: Any) -> bytes:
    return _dumps({"status": "OK", "op": "info", **info, "id": request_id})


def error_reply(error: ClapError, request_id: Any = None) -> bytes:
    request_id = getattr(error, "request_id", request_id)
    return _dumps({"status": "ERROR", "error": {"code": error.code, "message": error.message},
                   "id": request_id})
