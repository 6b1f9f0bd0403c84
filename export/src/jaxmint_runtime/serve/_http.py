"""HTTP/1.1 on asyncio with h11 as the parser: keep-alive, limits, graceful drain.

The bytes on the wire are parsed and written by h11, a maintained HTTP/1.1
implementation, so framing (line endings, header syntax, Host, Content-Length)
follows the RFC exactly as other servers read it; a request it cannot parse gets
its 400 and the connection is closed, since the stream can no longer be trusted.
Around it, only what an inference endpoint needs, with every size and time bounded:

- requests with ``Content-Length`` bodies (any ``Transfer-Encoding`` gets 501), at
  most ``max_body_bytes`` (413, before reading the body) and ``max_header_bytes`` of
  request line and headers (431); ``Expect: 100-continue`` is honoured;
- the application's ``admit(request)`` sees the request line and headers before
  the body is read (the bearer token is checked there); a refusal closes the
  connection without reading the body;
- HEAD responses carry the headers of the GET answer and no body;
- keep-alive by default on HTTP/1.1, pipelined requests answered in order, one at
  a time per connection; reading pauses while a connection has a request in
  flight and a full request buffered behind it;
- a connection idle for ``idle_timeout_s`` is closed, one that takes longer than
  ``read_timeout_s`` to send a request gets 408 (counted from its first byte: more
  bytes of noise do not reset it); past ``max_connections`` a new
  connection gets 503 and is closed;
- `Connections.drain` stops accepting, closes idle connections and lets busy ones
  finish their request (answered with ``Connection: close``).

The application is an object with ``handle(request)`` returning a `Response` or an
asyncio future of one, and ``responded(status)`` called for every response sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import h11

log = logging.getLogger("jaxmint_runtime.serve")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    idle_timeout_s: float = 60.0
    read_timeout_s: float = 30.0
    max_connections: int = 1024


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool = True
    received: float = field(default_factory=time.monotonic)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False


def error(status: int, message: str, *, close: bool = False, headers=()) -> Response:
    """A JSON ``{"error": message}`` response, the v2 protocol's error shape."""
    return Response(
        status, json.dumps({"error": message}).encode(), headers=tuple(headers), close=close
    )


class App(Protocol):
    def admit(self, request: Request) -> Response | None: ...

    def handle(self, request: Request) -> Response | asyncio.Future: ...

    def responded(self, status: int) -> None: ...


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_date_cache: list = [0, b""]


def _date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, email.utils.formatdate(now, usegmt=True).encode()]
    return _date_cache[1]


class Connections:
    """The open connections of one server: limits, idle sweeping and draining."""

    def __init__(self, app: App, limits: Limits):
        self.app, self.limits = app, limits
        self.open: set[HttpProtocol] = set()
        self.draining = False

    def protocol(self) -> HttpProtocol:
        return HttpProtocol(self)

    async def sweep_forever(self, period_s: float = 0.5) -> None:
        """Close idle connections and time out slow requests, every ``period_s``."""
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for conn in list(self.open):
                conn.check_timeouts(now)

    def drain(self) -> None:
        """No new requests: close idle connections; busy ones close after their response."""
        self.draining = True
        for conn in list(self.open):
            if conn.idle:
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()


class HttpProtocol(asyncio.Protocol):
    def __init__(self, connections: Connections):
        self.connections = connections
        self.limits = connections.limits
        self.app = connections.app
        self.transport: Any = None
        self.h11 = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes
        )
        self.request: Request | None = None  # head received, body arriving
        self.body = bytearray()
        self.busy = False  # a request is being handled; later ones wait in h11's buffer
        self.closed = False
        self.last_activity = time.monotonic()
        self.partial_since: float | None = None  # when the first byte of a request arrived
        self.reading = True
        self.writing = True  # False while the transport's write buffer is over its limit
        self.eof = False

    @property
    def buffered(self) -> int:
        return len(self.h11.trailing_data[0])

    @property
    def idle(self) -> bool:
        return not self.busy and self.request is None and not self.buffered

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.connections.draining:  # accepted just before the listener closed
            self.closed = True
            transport.close()
            return
        if len(self.connections.open) >= self.limits.max_connections:
            self._send_raw(error(503, "too many open connections; retry later", close=True))
            return
        self.connections.open.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.connections.open.discard(self)

    def eof_received(self) -> bool:
        # The client sent all it will send; keep the socket open to answer its request.
        self.eof = True
        self.h11.receive_data(b"")
        return self.busy

    def pause_writing(self) -> None:
        # The client does not read its responses: stop reading its requests until it does.
        self.writing = False
        self._pause_reading()

    def resume_writing(self) -> None:
        self.writing = True
        if not self.busy and not self.closed:
            self._resume_reading()
            self._next()

    def _pause_reading(self) -> None:
        if self.reading and not self.closed:
            self.transport.pause_reading()
            self.reading = False

    def _resume_reading(self) -> None:
        if not self.reading and not self.closed:
            self.transport.resume_reading()
            self.reading = True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.partial_since is None:
            self.partial_since = time.monotonic()
        try:
            self.h11.receive_data(data)
        except RuntimeError:  # data after the client's EOF: nothing to answer
            self.close()
            return
        if self.busy or not self.writing:
            if self.buffered > self.limits.max_body_bytes + self.limits.max_header_bytes:
                self._pause_reading()
            return
        self._next()

    # -- requests ------------------------------------------------------------------------
    def _next(self) -> None:
        while not self.busy and not self.closed and self.writing:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                status = e.error_status_hint if e.error_status_hint >= 400 else 400
                self._fail(status, f"malformed request: {str(e)[:200]}")
                return
            if event is h11.NEED_DATA:
                if self.request is None and self.buffered > self.limits.max_header_bytes:
                    self._fail(
                        431, f"request line and headers exceed {self.limits.max_header_bytes} bytes"
                    )
                break
            if event is h11.PAUSED or isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Request):
                if not self._start(event):
                    return
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.limits.max_body_bytes:  # only a lying client gets here
                    self._fail(413, "request body exceeds its Content-Length")
                    return
            elif isinstance(event, h11.EndOfMessage):
                request, self.request = self.request, None
                request.body = bytes(self.body)
                self.body = bytearray()
                self._dispatch(request)
        if self.eof and not self.busy and self.writing and self.request is None:
            self.close()  # the client sent its last request and it is answered

    def _start(self, event: h11.Request) -> bool:
        """A request's head: check it before a byte of its body is read."""
        if event.http_version not in (b"1.0", b"1.1"):
            version = event.http_version.decode("latin-1")[:10]
            return self._fail(505, f"HTTP version {version!r} is not supported; use HTTP/1.1")
        headers: dict[str, str] = {}
        size = len(event.method) + len(event.target) + 12
        for name, value in event.headers:
            key = name.decode("latin-1")
            size += len(name) + len(value) + 4
            if key in headers and key != "content-length":
                headers[key] += ", " + value.decode("latin-1")
            else:
                headers[key] = value.decode("latin-1")
        if size > self.limits.max_header_bytes:
            return self._fail(
                431, f"request line and headers exceed {self.limits.max_header_bytes} bytes"
            )
        if "transfer-encoding" in headers:
            return self._fail(501, "chunked request bodies are not supported; send Content-Length")
        length = int(headers.get("content-length", "0"))  # h11 checked its syntax
        if length > self.limits.max_body_bytes:
            return self._fail(
                413,
                f"request body of {length} bytes exceeds the limit of "
                f"{self.limits.max_body_bytes} (--max-body-bytes)",
            )
        request = Request(
            event.method.decode("ascii"),
            event.target.decode("latin-1"),
            headers,
            b"",
            keep_alive="close" not in _connection_tokens(headers)
            and (event.http_version == b"1.1" or "keep-alive" in _connection_tokens(headers)),
        )
        refusal = self.app.admit(request)
        if refusal is not None:  # answered without reading the body
            self._send(request, dataclasses.replace(refusal, close=refusal.close or length > 0))
            return not self.closed
        self.request = request
        if self.h11.client_is_waiting_for_100_continue:
            self._write(
                self.h11.send(
                    h11.InformationalResponse(status_code=100, headers=[], reason=b"Continue")
                )
            )
        return True

    def _dispatch(self, request: Request) -> None:
        try:
            result = self.app.handle(request)
        except Exception as e:  # a bug must cost one request, not the connection
            log.exception("handler failed on %s %s", request.method, request.path[:200])
            result = error(500, f"internal error: {e}")
        if isinstance(result, Response):
            self._send(request, result)
            return
        self.busy = True
        result.add_done_callback(lambda f, r=request: self._finish(f, r))

    def _finish(self, future: asyncio.Future, request: Request) -> None:
        self.busy = False
        if future.cancelled():
            response = error(503, "the request was cancelled", close=True)
        elif future.exception() is not None:
            log.error("handler failed", exc_info=future.exception())
            response = error(500, f"internal error: {future.exception()}")
        else:
            response = future.result()
        self._send(request, response)
        if not self.closed and self.writing:
            self._resume_reading()
            self._next()

    def _fail(self, status: int, message: str) -> bool:
        """Answer a request that cannot be read and close: the stream is not trusted after it."""
        self._send_raw(error(status, message, close=True))
        return False

    # -- responses -----------------------------------------------------------------------
    def _headers(self, response: Response, close: bool) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"Date", _date()),
            (b"Content-Type", response.content_type.encode("latin-1")),
            (b"Content-Length", b"%d" % len(response.body)),
        ]
        headers += [(n.encode("latin-1"), v.encode("latin-1")) for n, v in response.headers]
        if close:
            headers.append((b"Connection", b"close"))
        return headers

    def _send(self, request: Request, response: Response) -> None:
        """Answer ``request`` through h11 (HEAD: the headers, no body)."""
        if self.closed:
            return
        close = response.close or not request.keep_alive or self.connections.draining
        try:
            data = self.h11.send(
                h11.Response(
                    status_code=response.status,
                    headers=self._headers(response, close),
                    reason=_REASONS.get(response.status, "").encode(),
                )
            )
            if response.body and request.method != "HEAD":
                data += self.h11.send(h11.Data(data=response.body))
            data += self.h11.send(h11.EndOfMessage())
        except h11.LocalProtocolError:  # the request was refused before its body was read
            self._send_raw(response)
            return
        self._write(data)
        self.app.responded(response.status)
        self.last_activity = time.monotonic()
        self.partial_since = self.last_activity if self.buffered else None
        if close or self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
            self.close()
            return
        self.h11.start_next_cycle()

    def _send_raw(self, response: Response) -> None:
        """An answer outside h11's request cycle (a refused connection or request), then close."""
        if self.closed:
            return
        head = b"HTTP/1.1 %d %s\r\n" % (
            response.status,
            _REASONS.get(response.status, "").encode(),
        )
        head += b"".join(b"%s: %s\r\n" % kv for kv in self._headers(response, True))
        self._write(head + b"\r\n" + response.body)
        self.app.responded(response.status)
        self.close()

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.connections.open.discard(self)
            self.transport.close()  # flushes what was written first

    def check_timeouts(self, now: float) -> None:
        if self.busy or self.closed:
            return
        if self.request is not None or self.buffered:
            if (
                self.partial_since is not None
                and now - self.partial_since > self.limits.read_timeout_s
            ):
                self._fail(408, f"request not received within {self.limits.read_timeout_s:g} s")
        elif now - self.last_activity > self.limits.idle_timeout_s:
            self.close()


def _connection_tokens(headers: dict[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("connection", "").split(",")}
