"""The wire protocol: frames in, typed requests out; results in, reply frames out.

No I/O happens here. A WebSocket message is parsed and validated once, at the
edge, into its request model: the pydantic schema is the typed request the
service receives (:data:`OPS` maps each op to its model, read from the
model's ``op`` Literal; :meth:`Message.prepare` checks what spans fields and
derives the audio spec, the decoded buffers and the vectors). Every way a
message can be wrong raises a :class:`~clap_ws.errors.ClapError` whose
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
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import parse_qsl

import numpy as np
import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
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



# ---- shared field types ----------------------------------------------------------
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


# ---- requests: the JSON schemas are the typed requests ---------------------------------
class Message(BaseModel):
    """A request as the client sent it, validated. Subclasses name their ``op`` (a ``Literal``), which is how
    :data:`OPS` finds them; :meth:`prepare` then checks what spans fields and derives what the service needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: RequestId = None
    if TYPE_CHECKING:
        op: str  # each subclass declares it as a Literal

    @classmethod
    def ops(cls) -> tuple[str, ...]:
        """The ``op`` values this model answers to."""
        return tuple(get_args(cls.model_fields["op"].annotation))

    def prepare(self, defaults: ConnectionDefaults) -> None:
        """Check what one field cannot say alone; raise :class:`~clap_ws.errors.ClapError`. Nothing by default."""


class _Audio(Message):
    """Audio options; each falls back to the connection's (``?sample_rate=`` ...). The base64 text is dropped
    once decoded: only :attr:`buffers` (bytes) is kept, and only until the windows are made (:meth:`release`)."""

    sample_rate: Rate | None = None
    channels: StrictInt | None = Field(None, ge=1, le=64)
    normalize: Literal[NORMALIZE_MODES] | None = None  # type: ignore[valid-type]
    long_clip: Literal[LONG_CLIP_MODES] | None = None  # type: ignore[valid-type]
    _spec: AudioSpec = PrivateAttr(default_factory=AudioSpec)
    _buffers: list = PrivateAttr(default_factory=list)

    @property
    def spec(self) -> AudioSpec:
        return self._spec

    @property
    def buffers(self) -> list:
        """The decoded audio buffers (zero or more)."""
        return self._buffers

    def release(self) -> None:
        """Forget the audio bytes: the windows made from them are all that waits for the model."""
        self._buffers = []

    def prepare(self, defaults: ConnectionDefaults) -> None:
        self._spec = AudioSpec(
            sample_rate=defaults.spec.sample_rate if self.sample_rate is None else self.sample_rate,
            channels=self.channels or 1,
            normalize=self.normalize or defaults.spec.normalize,
            long_clip=self.long_clip or defaults.spec.long_clip,
        )
        check_rate(self._spec.sample_rate)
        texts = self.__dict__.get("audio_buffers") or []
        if texts:
            self._buffers = [_b64(b, f"audio_buffers[{i}]") for i, b in enumerate(texts)]
            self.__dict__["audio_buffers"] = None
        elif self.__dict__.get("audio_buffer") is not None:
            self._buffers = [_b64(self.__dict__["audio_buffer"], "audio_buffer")]
            self.__dict__["audio_buffer"] = None


class EmbedRequest(_Audio):
    """``embed`` (one ``audio_buffer``, or a binary frame: :meth:`from_frame`) with what to compute besides the
    embedding: prompt similarity, reference cosines, library matches, novelty against an archive."""

    op: Literal["embed"] = "embed"
    audio_buffer: StrictStr | None = None
    reply: Literal[REPLY_FORMATS] | None = None  # type: ignore[valid-type]
    descriptor: StrictBool = False  # behaviour descriptors on any path, as on /clap-bd
    prompts: list[Text] | None = Field(None, min_length=1)
    probs: StrictBool = False
    references: Any = None  # (r, 512) numbers, checked by prepare
    top_k: StrictInt | None = Field(None, ge=1, le=1000)
    library: Name | None = None
    tags: list[Name] | None = None
    archive: Name | None = None
    k: StrictInt = Field(15, ge=1, le=10_000)
    archive_add: StrictBool = False
    ids: list[ItemId] | None = None
    _references: np.ndarray | None = PrivateAttr(None)
    _warnings: tuple[str, ...] = PrivateAttr(())

    @classmethod
    def from_frame(cls, data: bytes, defaults: ConnectionDefaults) -> EmbedRequest:
        """A binary frame: the samples, with every option from the connection's URL query."""
        request = cls.model_construct(reply=defaults.reply)
        request._spec, request._buffers, request._warnings = defaults.spec, [data], defaults.warnings
        return request

    @property
    def batch(self) -> bool:
        return self.op == "embed_batch"

    @property
    def reference_vectors(self) -> np.ndarray | None:
        """``references`` as (r, 512) unit rows."""
        return self._references

    @property
    def warnings(self) -> tuple[str, ...]:
        """About the request itself (unknown URL query keys), named in every reply to it."""
        return self._warnings

    @property
    def scores(self) -> bool:
        """Whether anything besides the embedding (and descriptors) is asked for."""
        return bool(self.prompts or self.references is not None or self.top_k or self.archive)

    def prepare(self, defaults: ConnectionDefaults) -> None:
        if self.audio_buffer is None and self.op == "embed":
            raise _rejected(ErrorCode.BAD_REQUEST, "audio_buffer: Field required")
        super().prepare(defaults)
        self._references = None if self.references is None else _vectors(self.references, "references")
        if self.probs and not self.prompts:
            raise _rejected(ErrorCode.BAD_REQUEST, "probs needs prompts")
        if self.archive_add and not self.archive:
            raise _rejected(ErrorCode.BAD_REQUEST, "archive_add needs archive")
        if self.ids is not None and (not self.archive_add or len(self.ids) != len(self.buffers)):
            raise _rejected(ErrorCode.BAD_REQUEST, "ids go with archive_add, one per audio buffer")
        if self.reply is None:
            self.__dict__["reply"] = defaults.reply
        if self.reply == "binary" and self.scores:
            raise _rejected(ErrorCode.BAD_REQUEST, "binary replies carry embeddings only; ask for prompts, "
                            "references, top_k or archive with reply=json")
        if self.reply == "binary" and self.descriptor:
            raise _rejected(ErrorCode.BAD_REQUEST, "binary replies carry embeddings only; ask for descriptor with "
                            "reply=json")


class EmbedBatchRequest(EmbedRequest):
    """``embed_batch``: several buffers, one reply with a row each."""

    op: Literal["embed_batch"]  # type: ignore[assignment]
    audio_buffers: list[StrictStr] = Field(min_length=1)


class TextRequest(Message):
    op: Literal["embed_text"]
    texts: list[Text] = Field(min_length=1)


class _Item(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    library: Name
    id: StrictInt = Field(ge=0)


class SearchParams(BaseModel):
    """How to page and filter search results; the WebSocket ``search`` and the HTTP API share it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    top_k: StrictInt = Field(10, ge=1, le=MAX_TOP_K)
    offset: StrictInt = Field(0, ge=0, le=MAX_OFFSET)
    min_score: StrictFloat | None = Field(None, ge=-1.0, le=1.0)
    min_duration: StrictFloat | None = Field(None, ge=0.0)
    max_duration: StrictFloat | None = Field(None, ge=0.0)
    tags: list[Name] | None = Field(None, max_length=64)
    library: Name | None = None

    @property
    def page(self) -> Page:
        return Page(self.top_k, self.offset, self.min_score)

    @property
    def filters(self) -> Filters:
        return Filters(tuple(self.tags or ()), self.min_duration, self.max_duration)

    def check_durations(self) -> None:
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise _rejected(ErrorCode.BAD_REQUEST, "min_duration is larger than max_duration")


class SearchRequest(SearchParams, _Audio):
    """Search libraries by text, audio, an embedding or a library item (text + one of the others blends them),
    or browse them by filters alone."""

    op: Literal["search"]
    text: Text | None = None
    audio_buffer: StrictStr | None = None
    embedding: Any = None
    item: _Item | None = None  # "more like this": a library item's own embedding, the item left out
    alpha: StrictFloat = Field(0.5, ge=0.0, le=1.0)
    _vector: np.ndarray | None = PrivateAttr(None)

    @property
    def vector(self) -> np.ndarray | None:
        """``embedding`` as a (1, 512) unit row."""
        return self._vector

    @property
    def item_ref(self) -> tuple[str, int] | None:
        """``(library, id)`` of ``item``."""
        return None if self.item is None else (self.item.library, self.item.id)

    def prepare(self, defaults: ConnectionDefaults) -> None:
        self._vector = None if self.embedding is None else _vectors(self.embedding, "embedding", True)
        super().prepare(defaults)
        if len(self.buffers) + (self._vector is not None) + (self.item is not None) > 1:
            raise _rejected(ErrorCode.BAD_REQUEST, "search takes at most one of audio_buffer, embedding or item "
                            "(each with text or without)")
        self.check_durations()


class LibrariesRequest(Message):
    op: Literal["libraries"]


class ArchiveRequest(_Audio):
    """``archive_add``, ``novelty`` or ``archive_search``: embeddings, or audio to embed first."""

    op: Literal["archive_add", "novelty", "archive_search"]
    archive: Name
    embeddings: Any = None
    embedding: Any = None
    audio_buffer: StrictStr | None = None
    audio_buffers: list[StrictStr] | None = Field(None, min_length=1)
    ids: list[ItemId] | None = None
    k: StrictInt = Field(15, ge=1, le=10_000)
    top_k: StrictInt = Field(10, ge=1, le=1000)
    _rows: np.ndarray | None = PrivateAttr(None)

    @property
    def vectors(self) -> np.ndarray | None:
        """``embeddings`` (or ``embedding``) as unit rows; None when the request sends audio."""
        return self._rows

    def prepare(self, defaults: ConnectionDefaults) -> None:
        super().prepare(defaults)
        sources = [self.embeddings is not None, self.embedding is not None, bool(self.buffers)]
        if sum(sources) != 1:
            raise _rejected(ErrorCode.BAD_REQUEST,
                            f"{self.op} needs exactly one of embeddings, embedding, audio_buffer or audio_buffers")
        if self.embeddings is not None:
            self._rows = _vectors(self.embeddings, "embeddings")
        elif self.embedding is not None:
            self._rows = _vectors(self.embedding, "embedding", True)
        count = len(self._rows) if self._rows is not None else len(self.buffers)
        if self.ids is not None and (self.op != "archive_add" or len(self.ids) != count):
            raise _rejected(ErrorCode.BAD_REQUEST, f"ids must be given only with archive_add, one per item ({count})")


class ArchiveInfoRequest(Message):
    op: Literal["archive_info"]
    archive: Name | None = None


class ArchiveDropRequest(Message):
    op: Literal["archive_drop"]
    archive: Name


class _Triplet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    anchor: ItemId
    positive: ItemId
    negative: ItemId


class ProjectionFitRequest(Message):
    """Fit behaviour descriptors on a named archive, with optional people's triplets by item id."""

    op: Literal["projection_fit"]
    archive: Name
    dims: StrictInt = Field(6, ge=1, le=32)
    method: Literal["triplet", "pca"] = "triplet"
    hidden: list[StrictInt] = Field(default_factory=lambda: [64], max_length=2)
    triplets: list[_Triplet] = Field(default_factory=list, max_length=100_000)
    epochs: StrictInt = Field(20, ge=1, le=500)
    seed: StrictInt = 0


class ProjectionInfoRequest(Message):
    op: Literal["projection_info"]


class InfoRequest(Message):
    op: Literal["info"]


REQUESTS: tuple[type[Message], ...] = (
    EmbedRequest, EmbedBatchRequest, TextRequest, SearchRequest, LibrariesRequest, ArchiveRequest,
    ArchiveInfoRequest, ArchiveDropRequest, ProjectionFitRequest, ProjectionInfoRequest, InfoRequest)
OPS: dict[str, type[Message]] = {op: model for model in REQUESTS for op in model.ops()}
Request = Message


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
    return EmbedRequest.from_frame(data, defaults)


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


def _validate(data: dict, defaults: ConnectionDefaults, max_items: int) -> Message:
    op = data.get("op", "embed")
    model = OPS.get(op) if isinstance(op, str) else None
    if model is None:
        raise _rejected(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}; known: {', '.join(OPS)}")
    _too_many(data, max_items)
    try:
        request = model.model_validate(data)
    except ValidationError as exc:
        raise _rejected(ErrorCode.BAD_REQUEST, _describe(exc)) from None
    request.prepare(defaults)
    return request


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
