"""A small HTTP/1.1 server on asyncio: keep-alive, limits, graceful drain.

Only what an inference endpoint needs, with every size and time bounded:

- requests with ``Content-Length`` bodies (chunked request bodies get 501), at most
  ``max_body_bytes`` (413, before reading the body) and ``max_header_bytes`` of
  request line and headers (431); ``Expect: 100-continue`` is honoured;
- keep-alive by default on HTTP/1.1, pipelined requests answered in order, one at
  a time per connection; reading pauses while a connection has a request in
  flight and a full request buffered behind it;
- a connection idle for ``idle_timeout_s`` is closed, one that takes longer than
  ``read_timeout_s`` to send a request gets 408; past ``max_connections`` a new
  connection gets 503 and is closed;
- `Connections.drain` stops accepting, closes idle connections and lets busy ones
  finish their request (answered with ``Connection: close``).

The application is an object with ``handle(request)`` returning a `Response` or an
asyncio future of one, and ``responded(status)`` called for every response sent.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol

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
        self.buf = bytearray()
        self.busy = False  # a request is being handled; later ones wait in buf
        self.closed = False
        self.head: tuple | None = None  # the parsed request line and headers awaiting a body
        self.continued = False  # "100 Continue" already sent for this request
        self.last_activity = time.monotonic()
        self.partial_since: float | None = None  # when the first byte of a request arrived
        self.reading = True
        self.writing = True  # False while the transport's write buffer is over its limit
        self.eof = False

    @property
    def idle(self) -> bool:
        return not self.busy and not self.buf

    # -- asyncio callbacks ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.connections.draining:  # accepted just before the listener closed
            self.closed = True
            transport.close()
            return
        if len(self.connections.open) >= self.limits.max_connections:
            self._send(error(503, "too many open connections; retry later", close=True), False)
            return
        self.connections.open.add(self)

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.connections.open.discard(self)

    def eof_received(self) -> bool:
        # The client sent all it will send; keep the socket open to answer its request.
        self.eof = True
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
        now = time.monotonic()
        self.last_activity = now
        if not self.buf and not self.busy:
            self.partial_since = now
        self.buf += data
        if self.busy or not self.writing:
            if len(self.buf) > self.limits.max_body_bytes + self.limits.max_header_bytes:
                self._pause_reading()
            return
        self._next()

    # -- requests ------------------------------------------------------------------------
    def _next(self) -> None:
        while not self.busy and not self.closed and self.writing and self.buf:
            request = self._parse()
            if request is None:
                break
            try:
                result = self.app.handle(request)
            except Exception as e:  # a bug must cost one request, not the connection
                log.exception("handler failed on %s %s", request.method, request.path[:200])
                result = error(500, f"internal error: {e}")
            if isinstance(result, Response):
                self._send(result, request.keep_alive)
                continue
            self.busy = True
            result.add_done_callback(lambda f, r=request: self._finish(f, r))
        if self.eof and not self.busy and self.writing:
            self.close()  # the client sent its last request and it is answered

    def _finish(self, future: asyncio.Future, request: Request) -> None:
        self.busy = False
        if future.cancelled():
            response = error(503, "the request was cancelled", close=True)
        elif future.exception() is not None:
            log.error("handler failed", exc_info=future.exception())
            response = error(500, f"internal error: {future.exception()}")
        else:
            response = future.result()
        self._send(response, request.keep_alive)
        if not self.closed and self.writing:
            self._resume_reading()
            self._next()

    def _parse(self) -> Request | None:
        if self.head is None:
            while self.buf.startswith(b"\r\n"):  # stray line ends between requests
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n", 0, self.limits.max_header_bytes + 4)
            if end < 0:
                if len(self.buf) > self.limits.max_header_bytes:
                    self._fail(
                        431, f"request line and headers exceed {self.limits.max_header_bytes} bytes"
                    )
                return None
            self.head = self._parse_head(bytes(self.buf[:end]), end + 4)
            if self.head is None:
                return None
        method, target, version, headers, start, length = self.head
        if len(self.buf) < start + length:
            if (
                not self.continued
                and version == "HTTP/1.1"
                and headers.get("expect", "").lower() == "100-continue"
            ):
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                self.continued = True
            return None
        body = bytes(self.buf[start : start + length])
        del self.buf[: start + length]
        self.head, self.continued = None, False
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        return Request(method, target, headers, body, keep_alive)

    def _parse_head(self, raw: bytes, start: int) -> tuple | None:
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
            return self._fail(400, f"malformed request line {lines[0][:100]!r}")
        method, target, version = parts
        if version not in ("HTTP/1.1", "HTTP/1.0"):
            return self._fail(505, f"HTTP version {version[:20]!r} is not supported; use HTTP/1.1")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            if not colon or not name or name != name.strip():
                return self._fail(400, f"malformed header line {line[:100]!r}")
            key = name.lower()
            value = value.strip()
            if key == "content-length" and headers.get(key, value) != value:
                return self._fail(400, "conflicting Content-Length headers")
            headers[key] = value
        if "transfer-encoding" in headers:
            return self._fail(501, "chunked request bodies are not supported; send Content-Length")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or len(length_text) > 18:
            return self._fail(400, f"invalid Content-Length {length_text[:30]!r}")
        length = int(length_text)
        if length > self.limits.max_body_bytes:
            return self._fail(
                413,
                f"request body of {length} bytes exceeds the limit of "
                f"{self.limits.max_body_bytes} (--max-body-bytes)",
            )
        return method, target, version, headers, start, length

    def _fail(self, status: int, message: str) -> None:
        """Answer an unparseable request and close: the stream cannot be trusted after it."""
        self._send(error(status, message, close=True), False)
        self.buf.clear()
        return None

    # -- responses -----------------------------------------------------------------------
    def _send(self, response: Response, keep_alive: bool) -> None:
        if self.closed:
            return
        close = response.close or not keep_alive or self.connections.draining
        head = [
            b"HTTP/1.1 %d %s\r\n" % (response.status, _REASONS.get(response.status, "").encode()),
            b"Date: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            % (_date(), response.content_type.encode(), len(response.body)),
        ]
        for name, value in response.headers:
            head.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1")))
        head.append(b"Connection: close\r\n\r\n" if close else b"\r\n")
        self.transport.write(b"".join([*head, response.body]))
        self.last_activity = time.monotonic()
        self.partial_since = self.last_activity if self.buf else None
        self.app.responded(response.status)
        if close:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.connections.open.discard(self)
            self.transport.close()  # flushes what was written first

    def check_timeouts(self, now: float) -> None:
        if self.busy or self.closed:
            return
        if self.buf or self.head is not None:
            if (
                self.partial_since is not None
                and now - self.partial_since > self.limits.read_timeout_s
            ):
                self._send(
                    error(
                        408,
                        f"request not received within {self.limits.read_timeout_s:g} s",
                        close=True,
                    ),
                    False,
                )
        elif now - self.last_activity > self.limits.idle_timeout_s:
            self.close()
