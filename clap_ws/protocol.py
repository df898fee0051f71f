"""The wire protocol: frames in, typed requests out; results in, reply frames out.

No I/O happens here. A WebSocket message is parsed and validated once, at the
edge, into a frozen request object (:data:`Request`: :class:`EmbedRequest`,
:class:`TextRequest`, :class:`SearchRequest`, :class:`ArchiveRequest`,
:class:`ProjectionRequest`, :class:`LibrariesRequest` or
:class:`InfoRequest`); the service and the model trust it from then on. Every
way a message can be wrong raises a :class:`~clap_ws.errors.ClapError` whose
``code`` is documented in PROTOCOL.md, and :func:`error_reply` renders any of
them in the one error shape.

Message forms (PROTOCOL.md has the full text):

* binary frame - float32 PCM; rate, channels and options come from the URL
  query of the connection (``?sample_rate=44100``), unknown query keys ignored;
* text frame - a JSON object: ``{"audio_buffer": <base64>, "sample_rate": n}``
  or ``{"op": ..., ...}`` for the other ops (``OPS``); unknown fields are an
  error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import numpy as np
import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
)

from .audio import LONG_CLIP_MODES, NORMALIZE_MODES, AudioSpec, check_rate
from .constants import EMBED_DIM
from .errors import ClapError, ErrorCode, RequestError
from .search.library import Filters, Page

REPLY_FORMATS = ("json", "binary")
_QUERY_KEYS = ("sample_rate", "channels", "normalize", "long_clip", "reply")
_OTHER_QUERY_KEYS = ("token",)  # read by the server's handshake, not here


# ---- typed requests -------------------------------------------------------
@dataclass(frozen=True)
class Scoring:
    """What to compute from a fresh embedding besides the embedding itself."""

    prompts: tuple[str, ...] = ()
    probs: bool = False
    references: np.ndarray | None = None  # (r, 512), unit rows
    top_k: int = 0
    library: str | None = None
    tags: tuple[str, ...] = ()
    archive: str | None = None  # novelty against it
    k: int = 15
    archive_add: bool = False
    ids: tuple | None = None

    @property
    def active(self) -> bool:
        return bool(self.prompts or self.references is not None or self.top_k or self.archive)


@dataclass(frozen=True)
class EmbedRequest:
    """Embed one buffer (``batch=False``) or several (``embed_batch``)."""

    buffers: list
    spec: AudioSpec
    reply: str = "json"
    id: Any = None
    batch: bool = False
    scoring: Scoring = Scoring()
    warnings: tuple[str, ...] = ()  # about the request itself (e.g. unknown URL query keys)
    descriptor: bool = False  # add behaviour descriptors (also on /clap-bd)


@dataclass(frozen=True)
class TextRequest:
    texts: tuple[str, ...]
    id: Any = None


@dataclass(frozen=True)
class SearchRequest:
    """Search libraries by text, audio, an embedding or a library item (text + one of the others blends them),
    or browse them by filters alone."""

    id: Any = None
    text: str | None = None
    buffers: list = field(default_factory=list)  # zero or one
    spec: AudioSpec = AudioSpec()
    embedding: np.ndarray | None = None
    alpha: float = 0.5
    library: str | None = None
    item: tuple[str, int] | None = None  # (library, id): "more like this", the item itself left out
    page: Page = Page()
    filters: Filters = Filters()


@dataclass(frozen=True)
class LibrariesRequest:
    id: Any = None


@dataclass(frozen=True)
class ProjectionRequest:
    """``projection_fit`` (on a named archive, with optional people's triplets by item id) or ``projection_info``."""

    op: str
    id: Any = None
    archive: str | None = None
    dims: int = 6
    method: str = "triplet"
    hidden: tuple[int, ...] = (64,)
    triplets: tuple[tuple[Any, Any, Any], ...] = ()
    epochs: int = 20
    seed: int = 0


@dataclass(frozen=True)
class ArchiveRequest:
    """``archive_add``, ``novelty``, ``archive_search``, ``archive_info`` or ``archive_drop``."""

    op: str
    id: Any = None
    archive: str | None = None
    embeddings: np.ndarray | None = None  # (n, 512) unit rows, or audio below
    buffers: list = field(default_factory=list)
    spec: AudioSpec = AudioSpec()
    ids: tuple | None = None
    k: int = 15
    top_k: int = 10


@dataclass(frozen=True)
class InfoRequest:
    id: Any = None


Request = (EmbedRequest | TextRequest | SearchRequest | ArchiveRequest | InfoRequest | LibrariesRequest
           | ProjectionRequest)


@dataclass(frozen=True)
class ConnectionDefaults:
    """Options for binary frames, from the URL query and the server's defaults.

    A bad query value does not refuse the connection (probe connections must
    always open): it is kept in ``error`` and returned for each binary frame.
    """

    spec: AudioSpec = AudioSpec()
    reply: str = "json"
    error: ClapError | None = field(default=None, compare=False)
    warnings: tuple[str, ...] = ()  # unknown query keys, named in every JSON reply to a binary frame


# ---- JSON message schemas (validation only) -------------------------------
Rate = StrictFloat  # a JSON number (ints accepted); strings and booleans are refused
Text = Annotated[StrictStr, Field(min_length=1, max_length=2000)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=200)]
MAX_TOP_K, MAX_OFFSET = 1000, 100_000  # one page of search results; how deep pages go
ID_DEPTH, ID_BYTES = 8, 1024  # bounds of an id: JSON nested hundreds deep can be neither echoed nor saved


def _bounded_id(value: Any) -> Any:
    """A request or item id: any JSON value at most ``ID_DEPTH`` deep and ``ID_BYTES`` long once encoded."""
    if not _id_within_bounds(value):
        raise ValueError(f"an id must be JSON at most {ID_DEPTH} levels deep and {ID_BYTES} bytes long")
    return value


def _id_within_bounds(value: Any) -> bool:
    return _nested_at_most(value, ID_DEPTH) and len(orjson.dumps(value)) <= ID_BYTES


def _nested_at_most(value: Any, levels: int) -> bool:
    """Whether ``value`` nests lists and objects at most ``levels`` deep (stops early: no deep recursion)."""
    if isinstance(value, dict | list):
        inner = value.values() if isinstance(value, dict) else value
        return levels > 0 and all(_nested_at_most(v, levels - 1) for v in inner)
    return True


# Echoed and stored, so bounded (see _bounded_id). Integers beyond 64 bits are read as floats by the JSON parser.
ItemId = Annotated[Any, AfterValidator(_bounded_id)]
RequestId = ItemId


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: RequestId = None


class _Audio(_Message):
    sample_rate: Rate | None = None
    channels: StrictInt | None = Field(None, ge=1, le=64)
    normalize: Literal[NORMALIZE_MODES] | None = None  # type: ignore[valid-type]
    long_clip: Literal[LONG_CLIP_MODES] | None = None  # type: ignore[valid-type]


class _Scoring(_Audio):
    reply: Literal[REPLY_FORMATS] | None = None  # type: ignore[valid-type]
    descriptor: StrictBool = False  # behaviour descriptors on any path, as on /clap-bd
    prompts: list[Text] | None = Field(None, min_length=1)
    probs: StrictBool = False
    references: Any = None  # (r, 512) numbers, checked by _vectors
    top_k: StrictInt | None = Field(None, ge=1, le=1000)
    library: Name | None = None
    tags: list[Name] | None = None
    archive: Name | None = None
    k: StrictInt = Field(15, ge=1, le=10_000)
    archive_add: StrictBool = False
    ids: list[ItemId] | None = None


class _EmbedMessage(_Scoring):
    op: Literal["embed"] = "embed"
    audio_buffer: StrictStr


class _EmbedBatchMessage(_Scoring):
    op: Literal["embed_batch"]
    audio_buffers: list[StrictStr] = Field(min_length=1)


class _EmbedTextMessage(_Message):
    op: Literal["embed_text"]
    texts: list[Text] = Field(min_length=1)


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    library: Name
    id: StrictInt = Field(ge=0)


class _SearchMessage(_Audio):
    op: Literal["search"]
    text: Text | None = None
    audio_buffer: StrictStr | None = None
    embedding: Any = None
    item: _Item | None = None  # "more like this": a library item's own embedding, the item left out
    top_k: StrictInt = Field(10, ge=1, le=MAX_TOP_K)
    offset: StrictInt = Field(0, ge=0, le=MAX_OFFSET)
    min_score: StrictFloat | None = Field(None, ge=-1.0, le=1.0)
    min_duration: StrictFloat | None = Field(None, ge=0.0)
    max_duration: StrictFloat | None = Field(None, ge=0.0)
    alpha: StrictFloat = Field(0.5, ge=0.0, le=1.0)
    tags: list[Name] | None = Field(None, max_length=64)
    library: Name | None = None


class _LibrariesMessage(_Message):
    op: Literal["libraries"]


class _ArchiveMessage(_Audio):
    op: Literal["archive_add", "novelty", "archive_search"]
    archive: Name
    embeddings: Any = None
    embedding: Any = None
    audio_buffer: StrictStr | None = None
    audio_buffers: list[StrictStr] | None = Field(None, min_length=1)
    ids: list[ItemId] | None = None
    k: StrictInt = Field(15, ge=1, le=10_000)
    top_k: StrictInt = Field(10, ge=1, le=1000)


class _Triplet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    anchor: ItemId
    positive: ItemId
    negative: ItemId


class _ProjectionFitMessage(_Message):
    op: Literal["projection_fit"]
    archive: Name
    dims: StrictInt = Field(6, ge=1, le=32)
    method: Literal["triplet", "pca"] = "triplet"
    hidden: list[StrictInt] = Field(default_factory=lambda: [64], max_length=2)
    triplets: list[_Triplet] = Field(default_factory=list, max_length=100_000)
    epochs: StrictInt = Field(20, ge=1, le=500)
    seed: StrictInt = 0


class _ProjectionInfoMessage(_Message):
    op: Literal["projection_info"]


class _ArchiveInfoMessage(_Message):
    op: Literal["archive_info"]
    archive: Name | None = None


class _ArchiveDropMessage(_Message):
    op: Literal["archive_drop"]
    archive: Name


class _InfoMessage(_Message):
    op: Literal["info"]


_SCHEMAS: dict[str, type[_Message]] = {
            "embed": _EmbedMessage, "embed_batch": _EmbedBatchMessage, "embed_text": _EmbedTextMessage,
            "search": _SearchMessage, "archive_add": _ArchiveMessage, "novelty": _ArchiveMessage,
            "archive_search": _ArchiveMessage, "archive_info": _ArchiveInfoMessage,
            "archive_drop": _ArchiveDropMessage, "info": _InfoMessage, "libraries": _LibrariesMessage,
            "projection_fit": _ProjectionFitMessage, "projection_info": _ProjectionInfoMessage}
OPS = tuple(_SCHEMAS)


def _rejected(code: ErrorCode, message: str) -> RequestError:
    return RequestError(message, code=code)


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False)[:3]:
        where = ".".join(str(p) for p in err["loc"]) or "message"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}")
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _b64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _rejected(ErrorCode.BAD_BASE64, f"{where} is not valid base64") from None


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
    """Read binary-frame options from a URL query.

    Unknown keys do not refuse the connection (legacy clients must keep
    working) but are named in ``warnings``, so ``samplerate=44100`` is not
    silently read at the default rate.
    """
    pairs = parse_qsl(query, keep_blank_values=True)
    params = {k: v for k, v in pairs if k in _QUERY_KEYS}
    unknown = sorted({k for k, _ in pairs if k not in _QUERY_KEYS + _OTHER_QUERY_KEYS})
    warnings = tuple(f"unknown URL query key {key!r} ignored (known: {', '.join(_QUERY_KEYS)})" for key in unknown)
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
        return ConnectionDefaults(AudioSpec(sample_rate=default_rate), "json", error, warnings)
    except ClapError as exc:
        return ConnectionDefaults(AudioSpec(sample_rate=default_rate), "json", exc, warnings)
    return ConnectionDefaults(AudioSpec(**options), reply, None, warnings)


def parse_binary(data: bytes, defaults: ConnectionDefaults) -> EmbedRequest:
    if defaults.error is not None:
        raise defaults.error
    return EmbedRequest([data], defaults.spec, defaults.reply, warnings=defaults.warnings)


def _vectors(value: Any, where: str, single: bool = False) -> np.ndarray:
    """JSON numbers -> (n, 512) float32 unit rows; anything else is ``bad_request``."""
    try:
        array = np.asarray(value) if isinstance(value, list) else None
    except ValueError:  # ragged lists
        array = None
    if single and array is not None:
        array = array[None]
    shape = f"a list of {EMBED_DIM} numbers" if single else f"a list of lists of {EMBED_DIM} numbers"
    if array is None or array.dtype.kind not in "iuf" or array.ndim != 2 or array.shape[1] != EMBED_DIM \
            or len(array) == 0:
        raise _rejected(ErrorCode.BAD_REQUEST, f"{where} must be {shape}")
    array = array.astype(np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    if not np.isfinite(array).all() or not np.isfinite(norms).all() or (norms == 0).any():
        raise _rejected(ErrorCode.BAD_REQUEST, f"{where} must be finite, non-zero vectors")
    return array / norms


def _spec(msg: _Audio, defaults: ConnectionDefaults) -> AudioSpec:
    return AudioSpec(
        sample_rate=defaults.spec.sample_rate if msg.sample_rate is None else msg.sample_rate,
        channels=msg.channels or 1,
        normalize=msg.normalize or defaults.spec.normalize,
        long_clip=msg.long_clip or defaults.spec.long_clip,
    )


def _buffers(msg) -> list[bytes]:
    if getattr(msg, "audio_buffers", None):
        return [_b64(b, f"audio_buffers[{i}]") for i, b in enumerate(msg.audio_buffers)]
    if getattr(msg, "audio_buffer", None) is not None:
        return [_b64(msg.audio_buffer, "audio_buffer")]
    return []


def _too_many(data: dict, max_items: int) -> None:
    for key in ("audio_buffers", "embeddings", "texts", "prompts", "references"):
        value = data.get(key)
        if isinstance(value, list) and len(value) > max_items:
            raise _rejected(ErrorCode.TOO_MANY_ITEMS, f"{key} has {len(value)} items; this server takes at most "
                            f"{max_items} per request")


def parse_text(text: str | bytes, defaults: ConnectionDefaults, max_items: int) -> Request:
    """Validate one JSON message into a typed request.

    Raises :class:`~clap_ws.errors.ClapError` (``bad_json``, ``unknown_op``,
    ``bad_request``, ``too_many_items``, ``bad_base64``, ``bad_sample_rate``)
    carrying the message's ``id`` once it is known.
    """
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise _rejected(ErrorCode.BAD_JSON, f"the message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise _rejected(ErrorCode.BAD_JSON, f"the message must be a JSON object, not {type(data).__name__}")
    try:
        return _validate(data, defaults, max_items)
    except ClapError as exc:
        request_id = data.get("id")
        exc.request_id = request_id if _echoable(request_id) else None
        raise


def _echoable(value: Any) -> bool:
    """Whether an id can go back in an error reply: what :data:`RequestId` accepts."""
    try:
        return _id_within_bounds(value)
    except (TypeError, orjson.JSONEncodeError):
        return False


def _validate(data: dict, defaults: ConnectionDefaults, max_items: int) -> Request:
    op = data.get("op", "embed")
    schema = _SCHEMAS.get(op) if isinstance(op, str) else None
    if schema is None:
        raise _rejected(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; known: {', '.join(OPS)}")
    _too_many(data, max_items)
    try:
        msg = schema.model_validate(data)
    except ValidationError as exc:
        raise _rejected(ErrorCode.BAD_REQUEST, _describe(exc)) from None
    if isinstance(msg, _InfoMessage):
        return InfoRequest(msg.id)
    if isinstance(msg, _LibrariesMessage):
        return LibrariesRequest(msg.id)
    if isinstance(msg, _ProjectionInfoMessage):
        return ProjectionRequest("projection_info", msg.id)
    if isinstance(msg, _ProjectionFitMessage):
        return ProjectionRequest("projection_fit", msg.id, msg.archive, msg.dims, msg.method, tuple(msg.hidden),
                                 tuple((t.anchor, t.positive, t.negative) for t in msg.triplets), msg.epochs, msg.seed)
    if isinstance(msg, _EmbedTextMessage):
        return TextRequest(tuple(msg.texts), msg.id)
    if isinstance(msg, (_ArchiveInfoMessage, _ArchiveDropMessage)):
        return ArchiveRequest(msg.op, msg.id, msg.archive)
    assert isinstance(msg, _Audio)  # every other message carries audio options
    spec = _spec(msg, defaults)
    check_rate(spec.sample_rate)
    buffers = _buffers(msg)
    if isinstance(msg, _SearchMessage):
        return _search_request(msg, spec, buffers)
    if isinstance(msg, _ArchiveMessage):
        return _archive_request(msg, spec, buffers)
    assert isinstance(msg, _Scoring)  # embed and embed_batch
    return _embed_request(msg, spec, buffers, defaults.reply)


def _search_request(msg: _SearchMessage, spec: AudioSpec, buffers: list[bytes]) -> SearchRequest:
    embedding = None if msg.embedding is None else _vectors(msg.embedding, "embedding", True)
    if len(buffers) + (embedding is not None) + (msg.item is not None) > 1:
        raise _rejected(ErrorCode.BAD_REQUEST, "search takes at most one of audio_buffer, embedding or item "
                        "(each with text or without)")
    filters = Filters(tuple(msg.tags or ()), msg.min_duration, msg.max_duration)
    if msg.min_duration is not None and msg.max_duration is not None and msg.min_duration > msg.max_duration:
        raise _rejected(ErrorCode.BAD_REQUEST, "min_duration is larger than max_duration")
    item = None if msg.item is None else (msg.item.library, msg.item.id)
    return SearchRequest(msg.id, msg.text, buffers, spec, embedding, msg.alpha, msg.library, item,
                         Page(msg.top_k, msg.offset, msg.min_score), filters)


def _archive_request(msg: _ArchiveMessage, spec: AudioSpec, buffers: list[bytes]) -> ArchiveRequest:
    sources = [msg.embeddings is not None, msg.embedding is not None, bool(buffers)]
    if sum(sources) != 1:
        raise _rejected(ErrorCode.BAD_REQUEST,
                        f"{msg.op} needs exactly one of embeddings, embedding, audio_buffer or audio_buffers")
    vectors = None
    if msg.embeddings is not None:
        vectors = _vectors(msg.embeddings, "embeddings")
    elif msg.embedding is not None:
        vectors = _vectors(msg.embedding, "embedding", True)
    count = len(vectors) if vectors is not None else len(buffers)
    if msg.ids is not None and (msg.op != "archive_add" or len(msg.ids) != count):
        raise _rejected(ErrorCode.BAD_REQUEST, f"ids must be given only with archive_add, one per item ({count})")
    return ArchiveRequest(msg.op, msg.id, msg.archive, vectors, buffers, spec,
                          None if msg.ids is None else tuple(msg.ids), msg.k, msg.top_k)


def _embed_request(msg: _Scoring, spec: AudioSpec, buffers: list[bytes], default_reply: str) -> EmbedRequest:
    """``embed`` and ``embed_batch``."""
    scoring = Scoring(
        prompts=tuple(msg.prompts or ()), probs=msg.probs,
        references=None if msg.references is None else _vectors(msg.references, "references"),
        top_k=msg.top_k or 0, library=msg.library, tags=tuple(msg.tags or ()), archive=msg.archive, k=msg.k,
        archive_add=msg.archive_add, ids=None if msg.ids is None else tuple(msg.ids),
    )
    if msg.probs and not msg.prompts:
        raise _rejected(ErrorCode.BAD_REQUEST, "probs needs prompts")
    if msg.archive_add and not msg.archive:
        raise _rejected(ErrorCode.BAD_REQUEST, "archive_add needs archive")
    if scoring.ids is not None and (not msg.archive_add or len(scoring.ids) != len(buffers)):
        raise _rejected(ErrorCode.BAD_REQUEST, "ids go with archive_add, one per audio buffer")
    reply = msg.reply or default_reply
    if reply == "binary" and scoring.active:
        raise _rejected(ErrorCode.BAD_REQUEST, "binary replies carry embeddings only; ask for prompts, references, "
                        "top_k or archive with reply=json")
    if reply == "binary" and msg.descriptor:
        raise _rejected(ErrorCode.BAD_REQUEST, "binary replies carry embeddings only; ask for descriptor with "
                        "reply=json")
    return EmbedRequest(buffers, spec, reply, msg.id, isinstance(msg, _EmbedBatchMessage), scoring,
                        descriptor=msg.descriptor)


# ---- replies --------------------------------------------------------------------
def _dumps(obj: dict) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


def embedding_reply(request: EmbedRequest, embeddings: np.ndarray, *, model: str, seconds: float,
                    queue_ms: float, model_ms: float, extras: dict | None = None) -> tuple[bytes, bool]:
    """The reply frame for an embedding request, and whether it is text.

    ``extras`` holds per-clip lists (similarity, matches, novelty...); a
    single ``embed`` reply carries each one's only element.
    """
    if request.reply == "binary":
        return np.ascontiguousarray(embeddings, dtype="<f4").tobytes(), False
    body: dict[str, Any] = {"status": "OK"}
    if request.batch:
        body["embeddings"] = embeddings
        body["count"] = len(embeddings)
        body.update(extras or {})
    else:
        body["embedding"] = body["features"] = embeddings[0]
        body.update({key: values[0] for key, values in (extras or {}).items()})
    body.update(type="clap", model=model, time=seconds, extraction_time_ms=seconds * 1000,
                queue_ms=queue_ms, model_ms=model_ms, id=request.id)
    return _dumps(body), True


def ok_reply(op: str, body: dict, request_id: Any) -> bytes:
    return _dumps({"status": "OK", "op": op, **body, "id": request_id})


def error_reply(error: ClapError, request_id: Any = None) -> bytes:
    request_id = request_id if error.request_id is None else error.request_id
    return _dumps({"status": "ERROR", "error": {"code": ErrorCode(error.code).value, "message": error.message},
                   "id": request_id})
