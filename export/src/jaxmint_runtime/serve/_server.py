"""`Server`: the Open Inference Protocol v2 endpoints over loaded predictors.

One asyncio event loop thread reads requests, decodes and validates them and
writes responses; one `Batcher` thread per model runs the merged batches. The
loop never blocks on a model: a request waits on a future that the batcher
resolves (one loop wake-up per batch).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote

from jaxmint_runtime import __version__
from jaxmint_runtime._predictor import Predictor, load
from jaxmint_runtime.serve import _protocol
from jaxmint_runtime.serve._batcher import Batcher, QueueFull
from jaxmint_runtime.serve._http import Connections, Limits, Request, Response, error
from jaxmint_runtime.serve._metrics import Metrics

log = logging.getLogger("jaxmint_runtime.serve")

TOKEN_ENV = "JAXMINT_SERVE_TOKEN"
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # answered without a token
DEFAULT_MAX_BATCH = 32  # when an artifact declares no batch sizes


@dataclass(frozen=True)
class ServeConfig:
    """Every knob of `Server`; the CLI flags have the same names with dashes."""

    host: str = "127.0.0.1"
    port: int = 8000
    batching: bool = True
    max_batch_size: int | None = None  # None: the model's largest declared batch size
    max_delay_ms: float = 2.0
    max_queue: int = 256
    max_body_bytes: int = 64 * 1024 * 1024
    max_elements: int = 16 * 1024 * 1024
    token: str | None = None
    request_timeout_s: float = 60.0
    drain_timeout_s: float = 30.0
    idle_timeout_s: float = 60.0
    read_timeout_s: float = 30.0
    max_connections: int = 1024
    max_connections_per_client: int = 256
    grpc_port: int | None = None  # None: no gRPC; 0: any free port (needs the [grpc] extra)


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future
    model: str
    request: _protocol.InferRequest
    received: float
    grpc: bool = False  # resolved with (outputs, error) for the gRPC service to encode


class Server:
    """Serve predictors over HTTP; start it in a thread (`start`) or in the main thread.

    Example::

        with Server(["artifacts/digits"], port=0) as server:   # port 0: any free port
            print(server.url)            # http://127.0.0.1:PORT
    """

    def __init__(
        self,
        models: Iterable[str | os.PathLike | Predictor],
        config: ServeConfig | None = None,
        **overrides,
    ):
        self.config = replace(config or ServeConfig(), **overrides)
        self.models: dict[str, Predictor] = {}
        for m in models:
            predictor = m if isinstance(m, Predictor) else load(Path(m))
            if predictor.name in self.models:
                raise ValueError(
                    f"two artifacts are named {predictor.name!r}; model names must be unique"
                )
            # Bounded batch sizes, all compiled now: never an XLA compile on the request path.
            bucketed = predictor.bucketed(self.bucket_max(predictor))
            bucketed.warmup()
            self.models[predictor.name] = bucketed
        if not self.models:
            raise ValueError("give at least one artifact to serve")
        self.batchers: dict[str, Batcher] = {}
        self.metrics = Metrics(
            lambda: {name: b.depth for name, b in self.batchers.items()},
            lambda: len(self._connections.open) if self._connections else 0,
            lambda model: _protocol.MODEL_VERSION,
        )
        self.draining = False
        self.port: int | None = None
        self._token = self.config.token.encode() if self.config.token else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: asyncio.base_events.Server | None = None
        self._connections: Connections | None = None
        self._tasks: list[asyncio.Task] = []
        self._pending: set[_Pending] = set()  # submitted, not answered yet
        self._thread: threading.Thread | None = None
        self._grpc = None  # the grpc.aio server, when config.grpc_port is set
        self.grpc_port: int | None = None

    extensions = _protocol.EXTENSIONS

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def bucket_max(self, predictor: Predictor) -> int:
        """The largest batch one executable runs; larger requests run in chunks."""
        if self.config.max_batch_size is not None:
            return self.config.max_batch_size
        return max(predictor.batch_sizes, default=DEFAULT_MAX_BATCH)

    def max_batch_size(self, predictor: Predictor) -> int:
        if not self.config.batching:
            return 1
        if self.config.max_batch_size is not None:
            return self.config.max_batch_size
        return max(predictor.batch_sizes, default=DEFAULT_MAX_BATCH)

    # -- lifecycle ------------------------------------------------------------------------
    async def _open(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        for name, predictor in self.models.items():
            self.metrics.declare(name)
            self.batchers[name] = Batcher(
                predictor,
                lambda results: loop.call_soon_threadsafe(self._resolve, results),
                max_batch_size=self.max_batch_size(predictor),
                max_delay_s=self.config.max_delay_ms / 1000 if self.config.batching else 0.0,
                max_queue=self.config.max_queue,
                on_batch=lambda n, name=name: self.metrics.batch(name, n),
            )
        c = self.config
        limits = Limits(
            c.max_body_bytes,
            64 * 1024,
            c.idle_timeout_s,
            c.read_timeout_s,
            c.max_connections,
            c.max_connections_per_client,
        )
        self._connections = Connections(self, limits)
        try:
            self._listener = await loop.create_server(
                self._connections.protocol, c.host, c.port, reuse_address=True, backlog=1024
            )
        except OSError:
            for batcher in self.batchers.values():
                batcher.close(1)
            raise
        self.port = self._listener.sockets[0].getsockname()[1]
        if c.grpc_port is not None:
            await self._open_grpc(c.host, c.grpc_port)
        self._tasks = [
            loop.create_task(self._connections.sweep_forever()),
            loop.create_task(self._expire_forever()),
        ]

    async def _open_grpc(self, host: str, port: int) -> None:
        try:
            from jaxmint_runtime.serve import _grpc

            self._grpc, self.grpc_port = _grpc.make_server(self, host, port)
        except (ImportError, OSError) as e:
            self._listener.close()
            for batcher in self.batchers.values():
                batcher.close(1)
            if isinstance(e, OSError):
                raise
            raise ImportError(
                f"gRPC serving needs grpcio and protobuf ({e}): pip install "
                "'jaxmint-runtime[grpc]', or serve REST only (--no-grpc)"
            ) from None
        await self._grpc.start()

    async def _shutdown(self, timeout: float | None = None) -> bool:
        """Stop accepting, answer what is in flight, stop the batchers; True if all drained."""
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        self.draining = True
        self._listener.close()
        grpc_stopped = None
        if self._grpc is not None:  # no new RPCs; those in flight get the drain timeout
            grpc_stopped = asyncio.ensure_future(self._grpc.stop(timeout))
        self._connections.drain()
        for batcher in self.batchers.values():
            batcher.flush()
        deadline = time.monotonic() + timeout
        while self._connections.open and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        drained = not self._connections.open
        if not drained:
            log.warning(
                "%d connections still busy after %.1f s; closing them",
                len(self._connections.open),
                timeout,
            )
        loop = asyncio.get_running_loop()
        for batcher in self.batchers.values():
            await loop.run_in_executor(None, batcher.close, max(deadline - time.monotonic(), 1))
        self._connections.close_all()
        if grpc_stopped is not None:
            await grpc_stopped
        for task in self._tasks:
            task.cancel()
        return drained

    def start(self) -> Server:
        """Serve from a background thread; returns once listening (see `port`)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = asyncio.new_event_loop()
            try:
                loop.run_until_complete(self._open())
            except BaseException as e:
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="jaxmint-serve", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Drain and stop a server started with `start`; True if every request was answered."""
        if self._thread is None or self._loop is None:
            return True
        drained = asyncio.run_coroutine_threadsafe(self._shutdown(timeout), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = None
        return drained

    def serve_forever(
        self,
        *,
        signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
        on_ready: Callable[[Server], None] | None = None,
    ) -> bool:
        """Serve in this (main) thread until one of ``signals``, then drain; see `stop`."""

        async def main() -> bool:
            await self._open()
            stop = asyncio.Event()
            for s in signals:
                asyncio.get_running_loop().add_signal_handler(s, stop.set)
            if on_ready is not None:
                on_ready(self)
            await stop.wait()
            log.info("signal received: draining in-flight requests")
            return await self._shutdown()

        return asyncio.run(main())

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ---------------------------------------------------------------------------
    def responded(self, status: int) -> None:
        self.metrics.http(status)

    def admit(self, request: Request) -> Response | None:
        """Before the body is read: refuse a request without the bearer token."""
        path = request.path.rstrip("/") or "/"
        if self._token is not None and path not in OPEN_PATHS and not self._authorized(request):
            return error(
                401,
                "missing or wrong bearer token: send 'Authorization: Bearer TOKEN'",
                headers=[("WWW-Authenticate", "Bearer")],
            )
        return None

    def handle(self, request: Request) -> Response | asyncio.Future:
        """Answer an admitted request (the transport calls `admit` first)."""
        path = request.path.rstrip("/") or "/"
        parts = [unquote(p) for p in path.split("/")[1:]]
        if parts == ["metrics"]:
            return self._get(request) or Response(
                200, *self.metrics.render(request.headers.get("accept", ""))
            )
        if not parts or parts[0] != "v2":
            return self._not_found(request)
        if parts == ["v2"]:
            return self._get(request) or _json(
                200,
                {
                    "name": "jaxmint-serve",
                    "version": __version__,
                    "extensions": list(self.extensions),
                },
            )
        if parts[1:2] == ["health"] and len(parts) == 3 and parts[2] in ("live", "ready"):
            if parts[2] == "ready" and self.draining:
                return self._get(request) or error(400, "the server is shutting down")
            return self._get(request) or _json(200, {parts[2]: True})
        if parts[1:2] != ["models"] or len(parts) < 3:
            return self._not_found(request)
        name, rest = parts[2], parts[3:]
        predictor = self.models.get(name)
        if predictor is None:
            return error(404, f"unknown model {name!r}; this server serves {sorted(self.models)}")
        if rest[:1] == ["versions"]:
            if len(rest) < 2 or rest[1] != _protocol.MODEL_VERSION:
                return error(404, f"model {name!r} has only version {_protocol.MODEL_VERSION}")
            rest = rest[2:]
        if rest == ["infer"]:
            if request.method != "POST":
                return error(405, "infer takes POST", headers=[("Allow", "POST")])
            return self._infer(predictor, request)
        if rest == []:
            return self._get(request) or _json(200, _protocol.model_metadata(predictor))
        if rest == ["ready"]:
            if self.draining:
                return self._get(request) or error(400, "the server is shutting down")
            return self._get(request) or _json(200, {"name": name, "ready": True})
        if rest == ["config"]:
            return self._get(request) or _json(200, self._model_config(predictor))
        return self._not_found(request)

    def _authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, b"Bearer " + self._token)

    @staticmethod
    def _get(request: Request) -> Response | None:
        """None for a GET or HEAD (the transport sends HEAD's headers only); else a 405."""
        if request.method in ("GET", "HEAD"):
            return None
        return error(405, f"{request.path} takes GET", headers=[("Allow", "GET, HEAD")])

    @staticmethod
    def _not_found(request: Request) -> Response:
        return error(
            404,
            f"no endpoint {request.method} {request.path[:200]}; see the v2 "
            "protocol: /v2, /v2/health/{live,ready}, /v2/models/NAME[/ready|/infer]",
        )

    def _model_config(self, predictor: Predictor) -> dict:
        batcher = self.batchers[predictor.name]
        return {
            "name": predictor.name,
            "platform": f"jaxmint/{predictor.backend_name}",
            "max_batch_size": batcher.max_batch_size,
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(batcher.max_delay_s * 1e6),
                "max_queue_size": batcher.max_queue,
            }
            if self.config.batching
            else None,
            "declared_batch_sizes": predictor.batch_sizes,
            "batch_buckets": predictor.buckets,
            "input": _protocol.model_metadata(predictor)["inputs"],
            "output": _protocol.model_metadata(predictor)["outputs"],
        }

    # -- infer --------------------------------------------------------------------------------
    def _infer(self, predictor: Predictor, request: Request) -> Response | asyncio.Future:
        name = predictor.name
        try:
            body = self._decompress(request)
            header_length = request.headers.get("inference-header-content-length")
            if header_length is not None:
                if not header_length.isdigit() or len(header_length) > 18:
                    raise _protocol.ProtocolError(
                        f"Inference-Header-Content-Length must be a byte count, got "
                        f"{header_length[:30]!r}"
                    )
                header_length = int(header_length)
            decoded = _protocol.decode_infer(
                body, header_length, predictor, max_elements=self.config.max_elements
            )
        except _protocol.ProtocolError as e:
            self.metrics.infer(name, e.status)
            return error(e.status, str(e))
        future = self._loop.create_future()
        pending = _Pending(future, name, decoded, request.received)
        try:
            self.batchers[name].submit(decoded.arrays, decoded.batch, pending)
        except QueueFull as e:
            self.metrics.infer(name, 503)
            return error(503, str(e), headers=[("Retry-After", "1")])
        self._pending.add(pending)
        return future

    async def submit(self, model: str, request: _protocol.InferRequest, received: float) -> dict:
        """Run a decoded request through the model's batcher; its outputs (for gRPC).

        Raises `QueueFull`, or `ProtocolError` with status 500 (the model failed) or
        504 (no answer within ``request_timeout_s``).
        """
        future = self._loop.create_future()
        pending = _Pending(future, model, request, received, grpc=True)
        self.batchers[model].submit(request.arrays, request.batch, pending)
        self._pending.add(pending)
        answer = await future
        if isinstance(answer, Response):  # expired
            raise _protocol.ProtocolError(json.loads(answer.body)["error"], answer.status)
        outputs, exc = answer
        if exc is not None:
            raise _protocol.ProtocolError(f"model {model!r} failed: {exc}", 500)
        return outputs

    def _decompress(self, request: Request) -> bytes:
        encoding = request.headers.get("content-encoding", "identity").lower()
        if encoding == "identity":
            return request.body
        if encoding not in ("gzip", "deflate"):
            raise _protocol.ProtocolError(
                f"Content-Encoding {encoding[:30]!r} is not supported; use gzip, deflate or none",
                415,
            )
        limit = self.config.max_body_bytes
        inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
        try:
            body = inflater.decompress(request.body, limit + 1)
        except zlib.error as e:
            raise _protocol.ProtocolError(
                f"the {encoding} body cannot be decompressed ({e})"
            ) from None
        if len(body) > limit or inflater.unconsumed_tail:
            raise _protocol.ProtocolError(
                f"the decompressed body exceeds {limit} bytes (--max-body-bytes)", 413
            )
        if not inflater.eof:
            raise _protocol.ProtocolError(f"the {encoding} body is truncated")
        return body

    def _resolve(self, results: list) -> None:
        """Answer the requests of one batch (runs on the loop, called by the batcher)."""
        for pending, outputs, exc in results:
            if pending.future.done():  # timed out already: never answer twice
                continue
            if pending.grpc:
                self._pending.discard(pending)
                if exc is None:
                    self.metrics.infer(pending.model, 200, time.monotonic() - pending.received)
                else:
                    self.metrics.infer(pending.model, 500)
                pending.future.set_result((outputs, exc))
                continue
            if exc is not None:
                response = error(500, f"model {pending.model!r} failed: {exc}")
            else:
                try:
                    response = self._encode(pending, outputs)
                except Exception as e:  # an output the protocol cannot carry
                    log.exception("cannot encode the outputs of %r", pending.model)
                    response = error(500, f"cannot encode the outputs of {pending.model!r}: {e}")
            self._answer(pending, response)

    def _encode(self, pending: _Pending, outputs: dict) -> Response:
        labels = self.models[pending.model].labels
        body, header_length = _protocol.encode_infer(
            pending.model, pending.request, outputs, labels
        )
        if header_length is None:
            return Response(200, body)
        return Response(
            200,
            body,
            "application/octet-stream",
            (("Inference-Header-Content-Length", str(header_length)),),
        )

    async def _expire_forever(self, period_s: float = 0.5) -> None:
        """Answer 504 to requests waiting longer than ``request_timeout_s``."""
        while True:
            await asyncio.sleep(period_s)
            oldest = time.monotonic() - self.config.request_timeout_s
            for pending in [p for p in self._pending if p.received < oldest]:
                message = (
                    f"no answer from model {pending.model!r} within "
                    f"{self.config.request_timeout_s:g} s"
                )
                self._answer(pending, error(504, message))

    def _answer(self, pending: _Pending, response: Response) -> None:
        self._pending.discard(pending)
        seconds = time.monotonic() - pending.received if response.status == 200 else None
        self.metrics.infer(pending.model, response.status, seconds)
        pending.future.set_result(response)


def _json(status: int, obj) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode())
