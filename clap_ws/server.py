"""The WebSocket server: connections in, batched model calls, replies out.

:class:`ClapServer` is given a ready :class:`~clap_ws.model.ClapModel` (and
any libraries, archives and projection); it builds nothing itself, so tests
and benchmarks construct exactly what they need. This module is the I/O half;
:mod:`clap_ws.service` says what each request does. Per message the flow is
one way:

    frame -> protocol.parse_* -> service.dispatch (audio.load/windows -> batcher.submit)
          -> (worker thread: inference) -> extras -> protocol.*_reply -> frame

Each connection has a reader and a writer. The reader validates a message,
prepares its audio and queues the work at once (so a full queue answers
``busy`` immediately), then puts the pending reply on the connection's own
bounded FIFO; the writer sends replies strictly in the order requests
arrived. So replies to binary frames (which carry no id) come back in order,
a slow reader stops being read from instead of making the server buffer
without bound, and a client that goes away has its queued work cancelled
before it reaches the model.

``GET /health`` on the same port answers 200 while the inference worker is
alive and 503 when it is not (or while draining). SIGINT/SIGTERM (see
:func:`run`) stop accepting, finish in-flight work, close connections with
1001 and return.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from functools import partial
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from . import __version__
from .errors import ClapError, ErrorCode, ShuttingDown
from .http import DESCRIPTOR_PATH, HttpApi
from .model.clap import ClapModel
from .projection import Projection
from .protocol import (
    ConnectionDefaults,
    InfoRequest,
    LibrariesRequest,
    error_reply,
    parse_binary,
    parse_query,
    parse_text,
)
from .search.archive import Archives
from .search.library import Library
from .service import Service
from .state import ServerConfig, ServerState

_log = logging.getLogger(__name__)
PATHS = ("/", "/clap")
MiB = 1 << 20


async def _guarded(work: Awaitable[tuple[bytes, bool]], request_id,
                   outcome: Callable[[str], None]) -> tuple[bytes, bool]:
    """Await a reply; any failure becomes an error reply for that request only. ``outcome`` hears "ok" or
    the error code (not a request whose client left)."""
    try:
        reply = await work
        outcome("ok")
        return reply
    except ClapError as exc:
        outcome(ErrorCode(exc.code).value)
        return error_reply(exc, request_id), True
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        _log.exception("request failed")
        outcome(ErrorCode.INTERNAL.value)
        return error_reply(ClapError(f"internal error: {exc}"), request_id), True


def _settled(reply: tuple[bytes, bool]) -> asyncio.Future:
    """A reply frame known at once (an error found before any work), in the connection's queue like the rest."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(reply)
    return future


ERROR_LOG_S = 10.0  # at most one info line per this many seconds summing up error replies
ACCEPT_LOG_S = 10.0  # at most one log line per this many seconds about failed accepts
FD_RESERVE = 64  # descriptors kept for files, the model's libraries, logs and the listening sockets


def open_file_room(connections: int) -> int:
    """Raise the soft open-file limit toward the hard one, as far as ``connections`` need; return how many
    connections the limit leaves room for. Each connection is a descriptor, and past the limit every accept
    fails (EMFILE) while clients time out."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return connections if soft == resource.RLIM_INFINITY else max(1, min(connections, soft - FD_RESERVE))


class _Held:
    """Bytes of a connection's replies that are finished but not sent yet, and whether it may send more work."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self.room = asyncio.Event()
        self.room.set()

    def finished(self, reply: asyncio.Future) -> None:
        if not reply.cancelled() and reply.exception() is None:
            self.bytes += len(reply.result()[0])
            if self.bytes > self.limit:
                self.room.clear()

    def sent(self, size: int) -> None:
        self.bytes -= size
        if self.bytes <= self.limit:
            self.room.set()


class ClapServer:
    """Serve one resident model over WebSocket. Use ``async with`` or start/shutdown."""

    def __init__(self, model: ClapModel, config: ServerConfig | None = None, *,
                 libraries: Sequence[Library] = (), archives: Archives | None = None,
                 projection: Projection | None = None):
        self.model = model
        self.config = config = config or ServerConfig()
        self.state = ServerState(config)
        self.service = Service(
            model, state=self.state, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
            max_batch_ms=config.max_batch_ms, max_queue=config.max_queue, max_seconds=config.max_seconds,
            warm_up=config.warm_up,
            libraries=list(libraries), archives=archives, projection=projection, text_cache=config.text_cache,
            audio_cache=config.audio_cache,
        )
        self.batcher = self.service.batcher
        self.http = HttpApi(self.service, config)
        self._errors: dict[str, int] = {}  # error replies by code since the last summary line
        self._errors_logged = float("-inf")
        self._server: Server | None = None
        self._pending: dict[ServerConnection, asyncio.Queue] = {}
        self._held: dict[ServerConnection, _Held] = {}
        self._watchdog: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        self._library_watch: asyncio.Task | None = None
        self.port = config.port
        self.watchdog_interval = 1.0  # seconds between checks that the inference worker lives
        self.max_connections = config.max_connections  # lowered at start if file descriptors cannot cover it
        self.accept_failures = 0  # accept() calls that failed for lack of descriptors or memory
        self._accept_logged = float("-inf")
        self._loop_handler: Callable | None = None

    # ---- life cycle ---------------------------------------------------------
    async def start(self) -> ClapServer:
        room = open_file_room(self.config.max_connections)
        if room < self.config.max_connections:
            _log.warning("only %d open files are allowed (ulimit -n), so at most %d connections are taken, not "
                         "--max-connections %d: raise the hard limit to serve more", room + FD_RESERVE, room,
                         self.config.max_connections)
            self.max_connections = room
        loop = asyncio.get_running_loop()
        self._loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        self.batcher.start()
        await asyncio.to_thread(self.batcher.ready.wait)  # warm-up done on the worker thread
        self._server = await serve(
            self._connection, self.config.host, self.config.port,
            process_request=self.http.gate, process_response=self.http.identify,
            max_size=int(self.config.max_frame_mb * MiB),
            max_queue=4, compression=None,  # float32 audio does not compress; deflate costs CPU
            ping_interval=self.config.ping_interval, ping_timeout=self.config.ping_timeout,
            logger=logging.getLogger("clap_ws.connections"),  # websockets' per-connection lines (quiet by default)
        )
        self.port = self._server.sockets[0].getsockname()[1]  # the real one when port=0
        self._watchdog = asyncio.create_task(self._watch_worker())
        self._flusher = asyncio.create_task(self._flush_archives())
        if self.config.library_poll_s > 0 and self.service.libraries:
            self._library_watch = asyncio.create_task(self._watch_libraries())
        model = self.model.describe()
        _log.info("clap-ws %s listening on ws://%s:%d/clap", __version__, self.config.host, self.port)
        _log.info("model: %s | %s | device %s | precision %s | engine %s | text %s", model["model"],
                  model["architecture"], model["device"], model["precision"], model["engine"], model["tokenizer"])
        for lib in self.service.libraries.values():
            _log.info("library %r: %d items, %s index, from %s", lib.name, len(lib), lib.index.kind,
                      lib.path or "memory")
        if self.model.identity.untrained:
            _log.warning('model: "untrained" - RANDOM WEIGHTS (seed %s): embeddings are meaningless; '
                         "for tests and latency work only", self.model.identity.seed)
        return self

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, close connections, stop the worker.

        ``shutdown_timeout`` is a deadline, not a hope: in-flight requests get
        until then, closing handshakes a second more, and any connection still
        open after that (a client that reads nothing, say) is aborted, so the
        archives are always flushed and the process always exits.
        """
        if self.state.draining or self._server is None:
            return
        self.state.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout
        self._server.close(close_connections=False)
        waits = [q.join() for q in self._pending.values()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), self.config.shutdown_timeout)
            except asyncio.TimeoutError:
                _log.warning("shutdown: in-flight requests did not finish in %.0f s", self.config.shutdown_timeout)
        connections = list(self._pending)
        closing = [asyncio.ensure_future(c.close(1001, "server shutting down")) for c in connections]
        if closing:
            await asyncio.wait(closing, timeout=max(1.0, deadline - loop.time()))
        stuck = [c for c in connections if c.state is not State.CLOSED]
        if stuck:
            _log.warning("shutdown: aborting %d connection(s) that did not close in time", len(stuck))
            for connection in stuck:
                connection.transport.abort()
        try:
            await asyncio.wait_for(self._server.wait_closed(), 5)
        except asyncio.TimeoutError:
            _log.warning("shutdown: connection handlers still running; going on")
        for task in (self._watchdog, self._flusher, self._library_watch):
            if task:
                task.cancel()
        await asyncio.to_thread(self.service.close)  # finishes queued work, writes archives
        loop.set_exception_handler(self._loop_handler)
        _log.info("clap-ws stopped: %d batches, %d items served", self.batcher.batches, self.batcher.items)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """Log failed accepts (out of descriptors or memory) once per ``ACCEPT_LOG_S``, not once per attempt:
        asyncio retries every accept and would write thousands of lines a second. Anything else goes on."""
        if context.get("message") == "socket.accept() out of system resource":
            self.accept_failures += 1
            if loop.time() - self._accept_logged >= ACCEPT_LOG_S:
                self._accept_logged = loop.time()
                _log.error("cannot accept connections: %s (%d failed accepts so far; logged once per %.0f s)",
                           context.get("exception"), self.accept_failures, ACCEPT_LOG_S)
            return
        if self._loop_handler is not None:
            self._loop_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def __aenter__(self) -> ClapServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.shutdown()

    async def _watch_worker(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog_interval)
            if not self.batcher.alive and not self.state.draining:
                _log.error("inference worker died; restarting it")
                self.state.worker_restarts += 1
                self.batcher.start()

    async def _watch_libraries(self) -> None:
        """Pick up library files rebuilt while serving: a changed file is loaded beside the old one and swapped in;
        one that fails to load is logged once per change and the old one keeps serving."""
        seen = {name: lib.stamp() for name, lib in self.service.libraries.items()}
        while True:
            await asyncio.sleep(self.config.library_poll_s)
            for name, lib in list(self.service.libraries.items()):
                stamp = lib.stamp()
                if stamp is None or stamp == seen.get(name):
                    continue
                seen[name] = stamp
                try:
                    new = await self.service.reload_library(name)
                except Exception as exc:
                    _log.error("library %r changed on disk but cannot be loaded (still serving the old one, "
                               "%d items): %s", name, len(lib), exc)
                    continue
                _log.info("library %r reloaded from %s: %d items (was %d)", name, lib.path, len(new), len(lib))

    async def _flush_archives(self) -> None:
        while self.service.archives.directory is not None:
            await asyncio.sleep(self.config.archive_flush_s)
            try:
                await self.service.flush_archives()
            except Exception:
                _log.exception("writing archives failed; will retry")

    # ---- introspection --------------------------------------------------------
    def info(self) -> dict:
        """What ``{"op": "info"}`` answers: the model, the service and this server (one description)."""
        return self.service.describe()

    # ---- connections ------------------------------------------------------------
    async def _connection(self, ws: ServerConnection) -> None:
        assert ws.request is not None  # the handshake is done before the handler runs
        url = urlsplit(ws.request.path)
        descriptor = url.path == DESCRIPTOR_PATH
        if url.path not in PATHS and not descriptor:
            error = ClapError(f"unknown path {url.path!r}; connect to /clap (or /clap-bd for behaviour descriptors)",
                              code=ErrorCode.NOT_FOUND)
            await ws.send(error_reply(error), text=True)
            await ws.close(4404, "unknown path")
            return
        if len(self._pending) >= self.max_connections:
            self.service.metrics.rejected.labels("too_many_connections").inc()
            await ws.close(1013, "too many connections; try again later")
            return
        defaults = parse_query(url.query, self.config.sample_rate)
        pending: asyncio.Queue = asyncio.Queue(self.config.max_pipeline)
        self._pending[ws] = pending
        self.state.connections = len(self._pending)
        held = _Held(int(self.config.max_pending_mb * MiB))
        self._held[ws] = held
        reader = asyncio.create_task(self._read(ws, pending, held, defaults, descriptor))
        writer = asyncio.create_task(self._write(ws, pending, held))
        closed = asyncio.create_task(ws.wait_closed())
        try:  # whichever ends first ends the rest: a dropped client's reader may be waiting on a full pipeline
            await asyncio.wait((reader, writer, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer, closed):
                task.cancel()
            del self._pending[ws]
            self.state.connections = len(self._pending)
            self._held.pop(ws, None)
            while not pending.empty():  # the client left with work queued: drop it
                pending.get_nowait().cancel()
                pending.task_done()
            await asyncio.wait((reader, writer, closed))
        failure = None if reader.cancelled() else reader.exception()
        if failure is not None:
            raise failure  # a bug in the reader: websockets logs it and closes the connection

    async def _read(self, ws: ServerConnection, pending: asyncio.Queue, held: _Held, defaults: ConnectionDefaults,
                    descriptor: bool) -> None:
        """Take messages, queue their work and their replies' places in order, until the client closes."""
        try:
            async for message in ws:
                await held.room.wait()  # a client that takes no replies gets no more work done: bounded in bytes
                reply = await self._accept(message, defaults, descriptor, client=id(ws))
                del message  # only the windows made from it wait for the model, not the frame
                reply.add_done_callback(held.finished)
                await pending.put(reply)
        except ConnectionClosed:
            pass

    async def _write(self, ws: ServerConnection, pending: asyncio.Queue, held: _Held) -> None:
        """Send replies in order. A client that takes none for ``ping_timeout`` seconds is dropped: keepalive
        pings cannot tell, since they wait behind the full send buffer before their own timeout starts."""
        while True:
            reply = await pending.get()
            payload = b""
            try:
                payload, text = await reply
                await asyncio.wait_for(ws.send(payload, text=text), self.config.ping_timeout)
                held.sent(len(payload))
            except asyncio.TimeoutError:
                _log.info("dropping a client that read nothing for %.0f s", self.config.ping_timeout)
                ws.transport.abort()
                held.room.set()  # let the reader see the closed connection and end
                return
            except ConnectionClosed:
                held.room.set()
                return
            except Exception:  # a bug must cost one reply, never the connection's writer
                _log.exception("could not send a reply")
                held.sent(len(payload))
                await ws.send(error_reply(ClapError("internal error while replying")), text=True)
            finally:
                pending.task_done()

    async def _accept(self, message: str | bytes, defaults: ConnectionDefaults, descriptor: bool,
                      client: Hashable = None) -> asyncio.Future:
        """Validate a message and queue its work; return the future of its reply frame.

        A large text message is parsed on the service's decode thread (see
        :meth:`~clap_ws.service.Service.off_loop`); the JSON parser itself
        holds the GIL for the whole message, which binary frames avoid.
        """
        received = time.perf_counter()
        request_id = None
        op = "invalid"  # until the message parses
        try:
            if self.state.draining:
                raise ShuttingDown("the server is shutting down; reconnect to another server")
            if isinstance(message, str):
                request = await self.service.off_loop(len(message), parse_text, message, defaults,
                                                      self.config.max_items)
            else:
                request = parse_binary(message, defaults)
            request_id, op = request.id, request.op  # the op it is counted under in metrics
            work = await self.service.dispatch(request, received, descriptor, client=client)
            reply = asyncio.ensure_future(_guarded(work, request_id, partial(self._counted, op, received)))
            reply.add_done_callback(lambda r: work.cancel() if r.cancelled() else None)  # its client left
            if not isinstance(request, InfoRequest | LibrariesRequest):  # a page polling info is not load
                reply.add_done_callback(lambda _: self.state.recent.add(time.perf_counter() - received))
            return reply
        except ClapError as exc:
            self._counted(op, received, ErrorCode(exc.code).value)
            return _settled((error_reply(exc, request_id), True))
        except Exception:
            _log.exception("unexpected error handling a message")
            self._counted(op, received, ErrorCode.INTERNAL.value)
            return _settled((error_reply(ClapError("internal server error"), request_id), True))

    def _counted(self, op: str, received: float, outcome: str) -> None:
        """Count an answered request; error replies are logged at debug, and summed up at info once per
        ``ERROR_LOG_S`` (a client looping on a bad request must not flood the log)."""
        metrics = self.service.metrics
        metrics.requests.labels(op, outcome).inc()
        metrics.request_seconds.labels(op).observe(time.perf_counter() - received)
        if outcome == "ok":
            return
        if outcome == ErrorCode.BUSY.value:
            metrics.rejected.labels("busy").inc()
        _log.debug("%s answered with error %s", op, outcome)
        self._errors[outcome] = self._errors.get(outcome, 0) + 1
        now = time.monotonic()
        if now - self._errors_logged >= ERROR_LOG_S:
            summary = ", ".join(f"{code} {n}" for code, n in sorted(self._errors.items()))
            _log.info("error replies since the last such line: %s", summary)
            self._errors, self._errors_logged = {}, now


async def serve_until_signalled(model: ClapModel, config: ServerConfig, **parts) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with ClapServer(model, config, **parts):
        await stop.wait()
        _log.info("signal received: finishing in-flight requests")


def run(model: ClapModel, config: ServerConfig, **parts) -> None:
    """Blocking entry point used by ``clap-ws serve`` (parts: libraries, archives, projection)."""
    asyncio.run(serve_until_signalled(model, config, **parts))
