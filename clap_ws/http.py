"""The read-only HTTP side of the server's port: the search page, its JSON API and the libraries' audio.

Every route is a GET (websockets' HTTP parser takes no request body, so
anything with a body, such as a dropped sound, goes over the WebSocket):

    /                          the search page (a GET without ``Upgrade: websocket``)
    /static/NAME               the page's files, from ``clap_ws/web`` (a fixed list)
    /api/search?text=&...      one page of results (no text: browse by the filters)
    /api/similar?library=&id=  "more like this": nearest items to a library item, the item left out
    /api/libraries, /api/info  what is loaded; the server's state
    /api/waveform/LIB/ID       peaks for a thumbnail
    /audio/LIB/ID              the item's original file; single byte ranges (RFC 9110), so players can seek

Errors use the protocol's error shape with a fitting status. Nothing a
client sends is joined into a filesystem path: audio is looked up by item id
in a loaded library, and static files by name in a fixed table.
"""

from __future__ import annotations

import asyncio
import hmac
import mimetypes
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import numpy as np
import orjson
import soundfile
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .errors import ClapError, ErrorCode
from .metrics import CONTENT_TYPE as METRICS_TYPE
from .protocol import Name, SearchParams, Text, error_reply
from .state import ServerConfig

DESCRIPTOR_PATH = "/clap-bd"  # the WebSocket path whose replies add behavior_descriptor and projection_version

STATIC = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
          "style.css": "text/css; charset=utf-8", "clap-ws-client.js": "text/javascript; charset=utf-8",
          "favicon.svg": "image/svg+xml"}
STATUS = {ErrorCode.BAD_REQUEST: 400, ErrorCode.UNKNOWN_TAG: 400, ErrorCode.NOT_FOUND: 404,
          ErrorCode.UNKNOWN_LIBRARY: 404, ErrorCode.NO_LIBRARY: 404, ErrorCode.UNAUTHORIZED: 401,
          ErrorCode.FORBIDDEN: 403, ErrorCode.BUSY: 503, ErrorCode.SHUTTING_DOWN: 503,
          ErrorCode.TEXT_UNAVAILABLE: 503}
# The page's own files and nothing else: no script, style, font or media from another origin.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
       "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
AUDIO_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
               ".oga": "audio/ogg", ".opus": "audio/ogg", ".aif": "audio/aiff", ".aiff": "audio/aiff",
               ".m4a": "audio/mp4", ".webm": "audio/webm"}
HTTP_TOP_K = 150  # a page of results, as Freesound's API caps page_size
WAVEFORM_POINTS = 96
WAVEFORM_MAX_BYTES = 256 << 20  # larger files get no thumbnail rather than a long read


class HttpSearch(SearchParams):
    """``/api/search``: the WebSocket ``search`` op's paging and filters, with an HTTP page size."""

    top_k: StrictInt = Field(15, ge=1, le=HTTP_TOP_K)
    text: Text | None = None


class HttpSimilar(SearchParams):
    """``/api/similar``: more like one library item."""

    top_k: StrictInt = Field(15, ge=1, le=HTTP_TOP_K)
    library: Name
    id: StrictInt = Field(ge=0)


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_params(model: type[BaseModel], query: str) -> Any:
    """URL query -> a validated ``model``; unknown or repeated keys are ``bad_request`` (``tags`` may repeat, and
    may be comma-separated; ``token`` belongs to the token check)."""
    pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"]
    values: dict[str, Any] = {}
    for key, value in pairs:
        if key == "tags":
            values["tags"] = (*values.get("tags", ()), *(t.strip() for t in value.split(",") if t.strip()))
        elif key in values:
            raise ClapError(f"{key} is given more than once", code=ErrorCode.BAD_REQUEST)
        elif value != "":  # a blank form field means "not given"
            values[key] = value
    tags = values.pop("tags", None)
    try:  # query values are strings: numbers are read from them as JSON would be, then the list of tags added
        scalars = model.model_validate_strings(values).model_dump(exclude_unset=True)
        return model.model_validate(scalars if tags is None else {**scalars, "tags": list(tags)})
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "query"
        known = ", ".join(name for name in model.model_fields)
        message = f"unknown query key {where!r} (known: {known})" if err["type"] == "extra_forbidden" \
            else f"{where}: {err['msg']}"
        raise ClapError(message, code=ErrorCode.BAD_REQUEST) from None


def json_response(body: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return response(status, orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), "application/json", headers)


def error_response(error: ClapError, headers: list[tuple[str, str]] | None = None,
                   status: int | None = None) -> Response:
    status = status or STATUS.get(ErrorCode(error.code), 500)
    extra = list(headers or [])
    if status == 503:
        extra.append(("Retry-After", "1"))
    return response(status, error_reply(error), "application/json", extra)


def response(status: int, body: bytes, content_type: str, headers: list[tuple[str, str]] | None = None) -> Response:
    all_headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                           ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff"),
                           ("Connection", "close"), *(headers or [])])
    return Response(status, HTTPStatus(status).phrase, all_headers, body)


@dataclass(frozen=True)
class ByteRange:
    start: int
    stop: int  # exclusive


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """One ``bytes=`` range of a file of ``size`` bytes; None for the whole file (no header, or several
    ranges, which may be answered whole). Raises ``ValueError`` when the range cannot be satisfied."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    if match is None:
        return None  # other units or a list of ranges: the whole file is a valid answer
    first, last = match.groups()
    if first == "" and last == "":
        raise ValueError("empty range")
    if first == "":  # the last N bytes
        length = min(int(last), size)
        if length == 0:
            raise ValueError("empty suffix")
        return ByteRange(size - length, size)
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if start >= size or stop <= start:
        raise ValueError("range outside the file")
    return ByteRange(start, stop)


def read_bytes(path: Path, byte_range: ByteRange | None) -> bytes:
    with open(path, "rb") as f:
        if byte_range is None:
            return f.read()
        f.seek(byte_range.start)
        return f.read(byte_range.stop - byte_range.start)


def waveform_peaks(path: Path, points: int = WAVEFORM_POINTS) -> list[float]:
    """Peak absolute amplitude in ``points`` equal slices of a file, all channels, for a thumbnail."""
    if path.stat().st_size > WAVEFORM_MAX_BYTES:
        return []
    data, _ = soundfile.read(path, dtype="float32", always_2d=True)
    if len(data) == 0:
        return []
    magnitude = np.abs(data).max(axis=1)
    edges = np.linspace(0, len(magnitude), points + 1).astype(int)
    peaks = [float(magnitude[a:max(b, a + 1)].max()) if a < len(magnitude) else 0.0
             for a, b in zip(edges[:-1], edges[1:])]
    return [round(min(p, 1.0), 4) for p in peaks]


def static_file(name: str) -> bytes:
    return (resources.files("clap_ws") / "web" / name).read_bytes()


class HttpApi:
    """Answers the page, the API and the audio routes for one server.

    ``service`` is the server's :class:`~clap_ws.service.Service`; ``info``
    returns what ``/api/info`` shows. Search results carry each item's audio
    URL (:func:`preview_url`). Methods return a websockets ``Response``; the
    caller has already applied the origin rule and the token check.
    """

    def __init__(self, service, config: ServerConfig):
        self.service = service
        self.config = config
        self._routes: dict[str, Callable[[str], Awaitable[Response]]] = {
            "/api/search": self._search, "/api/similar": self._similar,
            "/api/libraries": self._libraries, "/api/info": self._info,
        }

    def identify(self, connection: ServerConnection, request, response) -> None:
        """Name the model on every accepted WebSocket handshake (``X-Clap-Model``, percent-encoded UTF-8), so a
        client that asks for bare binary replies, which carry no ``model`` field, still knows what made them."""
        if response.status_code == HTTPStatus.SWITCHING_PROTOCOLS:
            response.headers["X-Clap-Model"] = quote(self.service.model.identity.name, safe="/:@+()._-")

    def _authorized(self, request) -> bool:
        """Constant-time check of the bearer token or ``?token=`` against ``--token``; one header at most."""
        expected = (self.config.token or "").encode()
        headers = request.headers.get_all("Authorization")
        if len(headers) > 1:
            return False
        header = headers[0] if headers else ""
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not given:
            given = dict(parse_qsl(urlsplit(request.path).query)).get("token", "")
        return hmac.compare_digest(given.encode(), expected)

    def _origin_allowed(self, request) -> bool:
        """The web's origin rule: a browser page may connect only from this server's own origin or a listed one.

        Clients that send no ``Origin`` (Node, Python) are not browsers and
        are unaffected. The server's own origin is ``http(s)://HOST`` with the
        request's ``Host``, and only where that host is a loopback name or the
        address the server was told to bind: a page on ``evil.example`` that
        re-points its name at 127.0.0.1 (DNS rebinding) sends its own name.
        """
        origins = request.headers.get_all("Origin")
        if not origins:
            return True
        if len(origins) > 1:
            return False
        origin = origins[0]
        if origin in self.config.allowed_origins:
            return True
        host = request.headers.get_all("Host")
        if len(host) != 1 or origin not in (f"http://{host[0]}", f"https://{host[0]}"):
            return False
        hostname = urlsplit(origin).hostname or ""
        return hostname in ("localhost", "127.0.0.1", "::1", self.config.host.strip("[]"))

    async def gate(self, connection: ServerConnection, request):
        """Before any handshake: ``/health``, the origin rule, the token check, then either the WebSocket
        handshake (``Upgrade: websocket``) or the page and its API (:mod:`clap_ws.http`)."""
        path = urlsplit(request.path).path
        if path == "/health":
            return self._health()
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if not upgrade and request.method != "GET":
            refused = ClapError(f"{request.method} is not served here; every route is a GET",
                                code=ErrorCode.BAD_REQUEST)
            return error_response(refused, [("Allow", "GET")], status=HTTPStatus.METHOD_NOT_ALLOWED)
        if path == "/metrics" and not (self.config.metrics_token and self.config.token):
            return self._metrics()
        if not self._origin_allowed(request):
            self.service.metrics.rejected.labels("forbidden_origin").inc()
            if upgrade:
                return connection.respond(HTTPStatus.FORBIDDEN, "this Origin may not connect (see --allowed-origin)\n")
            return error_response(ClapError("this Origin may not read from this server (see --allowed-origin)",
                                            code=ErrorCode.FORBIDDEN))
        if self.config.token and (upgrade or self.is_api(path) or path == "/metrics") \
                and not self._authorized(request):
            self.service.metrics.rejected.labels("unauthorized").inc()
            if upgrade:
                response = connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token\n")
            else:
                response = error_response(ClapError("missing or wrong token: send Authorization: Bearer TOKEN, or "
                                                    "?token=TOKEN", code=ErrorCode.UNAUTHORIZED))
            response.headers["WWW-Authenticate"] = 'Bearer realm="clap-ws"'
            return response
        if path == "/metrics":
            return self._metrics()
        if upgrade or path in ("/clap", DESCRIPTOR_PATH):
            return None  # the handshake (or, without Upgrade, websockets' own 426 Upgrade Required)
        origin = request.headers.get("Origin")
        cors = [("Access-Control-Allow-Origin", origin), ("Vary", "Origin")] \
            if origin and origin in self.config.allowed_origins else []
        return await self.respond(request, cors)

    def _metrics(self) -> Response:
        return response(200, self.service.metrics.exposition(), METRICS_TYPE)

    def _health(self) -> Response:
        batcher, draining = self.service.batcher, self.service.state.draining
        alive = batcher.alive and not draining
        body = {"status": "ok" if alive else ("draining" if draining else "worker_dead"),
                "model": self.service.model.identity.name, "queue_depth": batcher.depth,
                "batches": batcher.batches, "items": batcher.items}
        return json_response(body, HTTPStatus.OK if alive else HTTPStatus.SERVICE_UNAVAILABLE)

    @staticmethod
    def is_api(path: str) -> bool:
        """Paths that hold data, and so need the token when the server has one."""
        return path.startswith(("/api/", "/audio/")) or path == "/api"

    async def respond(self, request: Request, cors: list[tuple[str, str]]) -> Response:
        """The answer to a GET that is not a WebSocket handshake. ``cors``: headers for an allowed other origin."""
        url = urlsplit(request.path)
        path = url.path
        try:
            if path in ("/", "/index.html"):
                return self._static("index.html", page=True)
            if path.startswith("/static/"):
                return self._static(path.removeprefix("/static/"))
            if path == "/favicon.ico":
                return self._static("favicon.svg")
            if path in self._routes:
                return with_headers(await self._routes[path](url.query), cors)
            if path.startswith("/audio/"):
                library, item = _item_path(path.removeprefix("/audio/"))
                return with_headers(await self._audio(library, item, request.headers.get("Range")), cors)
            if path.startswith("/api/waveform/"):
                library, item = _item_path(path.removeprefix("/api/waveform/"))
                return with_headers(await self._waveform(library, item), cors)
            raise ClapError(f"no such page or API route: {path!r} (the API: {', '.join(self._routes)}, "
                            "/api/waveform/LIBRARY/ID, /audio/LIBRARY/ID)", code=ErrorCode.NOT_FOUND)
        except ClapError as exc:
            return error_response(exc, cors)

    def _static(self, name: str, page: bool = False) -> Response:
        if name not in STATIC:
            raise ClapError(f"no static file {name!r}", code=ErrorCode.NOT_FOUND)
        headers = [("Content-Security-Policy", CSP), ("Referrer-Policy", "no-referrer")] if page else []
        return response(200, static_file(name), STATIC[name], headers)

    async def _search(self, query: str) -> Response:
        params: HttpSearch = parse_params(HttpSearch, query)
        params.check_durations()
        vector = await self.service.text_vector(params.text, client="http") if params.text else None
        return json_response(self._page(await self.service.find(
            vector, params.library, params.page, params.filters)))

    async def _similar(self, query: str) -> Response:
        params: HttpSimilar = parse_params(HttpSimilar, query)
        params.check_durations()
        vector = self.service.item_vector(params.library, params.id)
        return json_response(self._page(await self.service.find(
            vector, None, params.page, params.filters, exclude=(params.library, params.id))))

    def _page(self, page: dict) -> dict:
        for result in page["results"]:
            result["preview_url"] = preview_url(result["library"], result["id"])
        return {**page, "model": self.service.model.identity.name}

    async def _libraries(self, query: str) -> Response:
        parse_params(_NoParams, query)
        return json_response({"libraries": self.service.describe_libraries(),
                              "model": self.service.model.identity.name})

    async def _info(self, query: str) -> Response:
        parse_params(_NoParams, query)
        return json_response(self.service.describe())

    def _file(self, library: str, item: int) -> Path:
        lib = self.service.library(library)
        meta = lib.item(item)
        root = Path(lib.root).resolve()
        path = (root / meta["path"]).resolve()
        if not path.is_relative_to(root):  # a library file edited by hand must not reach outside its folder
            raise ClapError(f"item {item} of library {library!r} lies outside its folder", code=ErrorCode.NOT_FOUND)
        if not path.is_file():
            raise ClapError(f"the file of item {item} ({meta['path']}) is gone from {lib.root}",
                            code=ErrorCode.NOT_FOUND)
        return path

    async def _audio(self, library: str, item: int, range_header: str | None) -> Response:
        path = self._file(library, item)
        size = path.stat().st_size
        content_type = AUDIO_TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] \
            or "application/octet-stream"
        try:
            byte_range = parse_range(range_header, size)
        except ValueError:
            return response(416, b"", content_type, [("Content-Range", f"bytes */{size}")])
        body = await asyncio.to_thread(read_bytes, path, byte_range)
        headers = [("Accept-Ranges", "bytes"), ("Content-Disposition", f'inline; filename="{_ascii(path.name)}"')]
        if byte_range is None:
            return response(200, body, content_type, headers)
        headers.append(("Content-Range", f"bytes {byte_range.start}-{byte_range.stop - 1}/{size}"))
        return response(206, body, content_type, headers)

    async def _waveform(self, library: str, item: int) -> Response:
        path = self._file(library, item)
        try:
            peaks = await asyncio.to_thread(waveform_peaks, path)
        except (OSError, RuntimeError, soundfile.LibsndfileError):
            peaks = []
        return json_response({"library": library, "id": item, "peaks": peaks})


def preview_url(library: str, item: int) -> str:
    return f"/audio/{quote(library, safe='')}/{item}"


def with_headers(response: Response, headers: list[tuple[str, str]]) -> Response:
    for name, value in headers:
        response.headers[name] = value
    return response


def _item_path(rest: str) -> tuple[str, int]:
    """``LIBRARY/ID`` (the name percent-encoded) -> (name, id); anything else is ``not_found``."""
    parts = rest.split("/")
    if len(parts) != 2 or not parts[0] or not re.fullmatch(r"[0-9]{1,12}", parts[1]):
        raise ClapError("expected /LIBRARY/ID with a numeric item id", code=ErrorCode.NOT_FOUND)
    return unquote(parts[0]), int(parts[1])


def _ascii(name: str) -> str:
    return "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in name)
