"""HTTP/1.1 on asyncio with llhttp as the parser: keep-alive, limits, graceful drain.

Requests are parsed by llhttp (Node.js's HTTP parser, through the ``httptools``
binding that uvicorn uses), strict by default: a bare LF, obs-fold, a space or NUL
in a header name, a malformed Content-Length, or Content-Length beside
Transfer-Encoding are errors, so framing is read exactly as other servers read it.
A request it cannot parse gets its 400 and the connection is closed, since the
stream can no longer be trusted; this module checks for exactly one Host header
per HTTP/1.1 request. (h11 was the other candidate: ``benchmarks/http_parsers.py``
measures llhttp at 0.05 of h11's time per request.)
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
  bytes of noise do not reset it); past ``max_connections`` (or
  ``max_connections_per_client`` from one address) a new
  connection gets 503 and is closed;
- `Connections.drain` stops accepting, closes idle connections and lets busy ones
  finish their request (answered with ``Connection: close``).

The application is an object with ``handle(request)`` returning a `Response` or an
asyncio future of one, and ``responded(status)`` called for every response sent.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import email.utils
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

import httptools

log = logging.getLogger("jaxmint_runtime.serve")


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    idle_timeout_s: float = 60.0
    read_timeout_s: float = 30.0
    max_connections: int = 1024
    max_connections_per_client: int = 256


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]  # lower-case names
    body: bytes
    keep_alive: bool = True
    received: float = field(default_factory=time.monotonic)
    admitted: bool = False  # the application's admit() accepted its head

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
    def admit(self, request: Request) -> Response | None:
        """Called once per request, before ``handle``: a refusal is answered instead."""
        ...

    def handle(self, request: Request) -> Response | asyncio.Future: ...

    def responded(self, status: int) -> None: ...


_REASONS = {s.value: s.phrase for s in HTTPStatus}
_RETRY = (("Retry-After", "1"),)
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
        self.per_client: dict[str | None, int] = {}  # open connections by peer address
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


class _Stop(Exception):
    """Raised from a parser callback once the request has been answered and closed."""


class HttpProtocol(asyncio.Protocol):
    MAX_QUEUED = 64  # pipelined requests buffered behind the one in flight

    def __init__(self, connections: Connections):
        self.connections = connections
        self.limits = connections.limits
        self.app = connections.app
        self.transport: Any = None
        self.client: str | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: collections.deque[Request] = collections.deque()  # complete requests
        self.request: Request | None = None  # head received, body arriving
        self.in_message = False
        self.body = bytearray()
        self.failure: tuple[int, str] | None = None  # answered after the queued requests
        self.busy = False  # a request is being handled; later ones wait in the queue
        self.closed = False
        self.last_activity = time.monotonic()
        self.partial_since: float | None = None  # first byte of a request not yet complete
        self.reading = True
        self.writing = True  # False while the transport's write buffer is over its limit
        self.eof = False
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0

    @property
    def idle(self) -> bool:
        return not self.busy and not self.queue and not self.in_message

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.connections.draining:  # accepted just before the listener closed
            self.closed = True
            transport.close()
            return
        if len(self.connections.open) >= self.limits.max_connections:
            self._send_raw(
                error(503, "too many open connections; retry later", close=True, headers=_RETRY)
            )
            return
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if isinstance(peer, tuple) else None
        per_client = self.connections.per_client
        if per_client.get(self.client, 0) >= self.limits.max_connections_per_client:
            self._send_raw(
                error(
                    429,
                    f"this client has {self.limits.max_connections_per_client} connections open "
                    "(--max-connections-per-client); reuse them or retry later",
                    close=True,
                    headers=_RETRY,
                )
            )
            return
        per_client[self.client] = per_client.get(self.client, 0) + 1
        self.connections.open.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._forget()

    def _forget(self) -> None:
        """Stop counting this connection (once), in the totals and for its client."""
        if self in self.connections.open:
            self.connections.open.discard(self)
            per_client = self.connections.per_client
            per_client[self.client] -= 1
            if not per_client[self.client]:
                del per_client[self.client]

    def eof_received(self) -> bool:
        # The client sent all it will send; keep the socket open to answer its requests.
        self.eof = True
        return self.busy or bool(self.queue)

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
        if not self.reading and not self.closed and self.failure is None:
            self.transport.resume_reading()
            self.reading = True

    def data_received(self, data: bytes) -> None:
        if self.closed or self.failure is not None:
            return
        if self.partial_since is None:
            self.partial_since = time.monotonic()  # not reset by more bytes, only by a request
        try:
            self.parser.feed_data(data)
        except _Stop:
            return
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Stop) or self.closed:
                return
            self.failure = (400, f"malformed request: {e}")
        except httptools.HttpParserUpgrade:
            self.failure = (501, "protocol upgrades are not supported")
        except httptools.HttpParserError as e:
            self.failure = (400, f"malformed request: {str(e)[:200]}")
        if self.failure is not None:
            self._pause_reading()  # answer what came before it, then the failure, then close
        elif len(self.queue) >= self.MAX_QUEUED:
            self._pause_reading()
        self._next()

    # -- parser callbacks (llhttp) -------------------------------------------------------
    def on_message_begin(self) -> None:
        self.in_message = True
        self._url, self._headers, self._head_bytes = bytearray(), [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._grow(len(name) + len(value) + 4)

    def _grow(self, n: int) -> None:
        self._head_bytes += n
        if self._head_bytes > self.limits.max_header_bytes:
            self._refuse(
                431, f"request line and headers exceed {self.limits.max_header_bytes} bytes"
            )

    def on_headers_complete(self) -> None:
        """A request's head: check it before a byte of its body is read."""
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self._refuse(505, f"HTTP version {version[:10]!r} is not supported; use HTTP/1.1")
        headers: dict[str, str] = {}
        hosts = 0
        for name, value in self._headers:
            key = name.decode("latin-1").lower()
            hosts += key == "host"
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        if version == "1.1" and hosts != 1:
            self._refuse(400, "an HTTP/1.1 request needs exactly one Host header")
        if "transfer-encoding" in headers:
            self._refuse(501, "chunked request bodies are not supported; send Content-Length")
        length = int(headers.get("content-length", "0"))  # llhttp checked its syntax
        if length > self.limits.max_body_bytes:
            self._refuse(
                413,
                f"request body of {length} bytes exceeds the limit of "
                f"{self.limits.max_body_bytes} (--max-body-bytes)",
            )
        request = Request(
            self.parser.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            headers,
            b"",
            keep_alive=self.parser.should_keep_alive(),
        )
        if not self.queue and not self.busy:  # else admitted when its turn comes
            refusal = self.app.admit(request)
            if refusal is not None:  # answered without reading the body
                self._send(request, dataclasses.replace(refusal, close=True))
                raise _Stop
            request.admitted = True
        self.request, self.body = request, bytearray()
        expects = headers.get("expect", "").lower() == "100-continue"
        if version == "1.1" and expects and not self.queue and not self.busy:
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        request, self.request = self.request, None
        request.body = bytes(self.body)
        self.body = bytearray()
        self.in_message = False
        self.queue.append(request)
        self.partial_since = None

    def _refuse(self, status: int, message: str) -> None:
        """From a callback: answer (after what is queued) and stop reading this stream."""
        if self.queue or self.busy:
            self.failure = (status, message)
            self._pause_reading()
        else:
            self._fail(status, message)
        raise _Stop

    # -- requests ------------------------------------------------------------------------
    def _next(self) -> None:
        while not self.busy and not self.closed and self.writing and self.queue:
            request = self.queue.popleft()
            refusal = None if request.admitted else self.app.admit(request)
            if refusal is not None:
                self._send(request, refusal)
                continue
            self._dispatch(request)
        if self.closed or self.busy or self.queue or not self.writing:
            return
        if self.failure is not None:
            self._fail(*self.failure)
        elif self.eof and not self.in_message:
            self.close()  # the client sent its last request and it is answered
        else:
            self._resume_reading()

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
            self._next()

    def _fail(self, status: int, message: str) -> None:
        """Answer a request that cannot be read and close: the stream is not trusted after it."""
        self._send_raw(error(status, message, close=True))

    # -- responses -----------------------------------------------------------------------
    @staticmethod
    def _head(response: Response, close: bool) -> bytes:
        head = [
            b"HTTP/1.1 %d %s\r\n" % (response.status, _REASONS.get(response.status, "").encode()),
            b"Date: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            % (_date(), response.content_type.encode("latin-1"), len(response.body)),
        ]
        for name, value in response.headers:
            head.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        head.append(b"Connection: close\r\n\r\n" if close else b"\r\n")
        return b"".join(head)

    def _send(self, request: Request, response: Response) -> None:
        """Answer ``request`` (HEAD: the headers, no body)."""
        if self.closed:
            return
        close = response.close or not request.keep_alive or self.connections.draining
        body = b"" if request.method == "HEAD" else response.body
        self._write(self._head(response, close) + body)
        self.app.responded(response.status)
        self.last_activity = time.monotonic()
        if close:
            self.close()

    def _send_raw(self, response: Response) -> None:
        """An answer outside a request (a refused connection or request), then close."""
        if self.closed:
            return
        self._write(self._head(response, True) + response.body)
        self.app.responded(response.status)
        self.close()

    def _write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._forget()
            self.transport.close()  # flushes what was written first

    def check_timeouts(self, now: float) -> None:
        if self.busy or self.closed or self.queue:
            return
        if self.partial_since is not None:
            if now - self.partial_since > self.limits.read_timeout_s:
                self._fail(408, f"request not received within {self.limits.read_timeout_s:g} s")
        elif now - self.last_activity > self.limits.idle_timeout_s:
            self.close()
