"""`Server`: the Open Inference Protocol v2 endpoints over loaded predictors.

One asyncio event loop thread reads requests, decodes and validates them and
writes responses; one `Batcher` thread per model runs the merged batches. The
loop never blocks on a model: a request waits on a future that the batcher
resolves (one loop wake-up per batch).
"""

from __future__ import annotations

import asyncio
import gc
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
from jaxmint_runtime.serve._batcher import Batcher, LoopBatcher, QueueFull
from jaxmint_runtime.serve._http import Connections, Limits, Request, Response, error
from jaxmint_runtime.serve._metrics import Metrics
from jaxmint_runtime.serve._repository import RepositoryError, VersionPolicy, is_artifact, scan

log = logging.getLogger("jaxmint_runtime.serve")

TOKEN_ENV = "JAXMINT_SERVE_TOKEN"
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # answered without a token
DEFAULT_MAX_BATCH = 32  # when an artifact declares no batch sizes
# --batch-on auto: a full batch this fast runs on the event loop. On 2 cores the server
# spends 60-115 us of CPU per batched request (benchmarks/batching.py), so a batch of
# 32 at 0.5 ms is well under what the loop spends reading its requests; a worker
# thread only pays once the model's time is a large share of the loop's.
LOOP_BATCH_S = 0.0005


@dataclass(frozen=True)
class ServeConfig:
    """Every knob of `Server`; the CLI flags have the same names with dashes."""

    host: str = "127.0.0.1"
    port: int = 8000
    batching: bool = True
    max_batch_size: int | None = None  # None: the model's largest declared batch size
    max_delay_ms: float = 2.0
    batch_window: str = "adaptive"  # or "fixed": always wait up to max_delay_ms (see Batcher)
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
    version_policy: str = "latest:1"  # of a repository: latest:N, all, specific:V1,V2
    poll_interval_s: float = 0.0  # rescan repositories this often (0: only on load requests)
    backend: str = "auto"  # for artifacts the server loads itself
    allow_expired: bool = False
    batch_on: str = "auto"  # "thread", "loop" (on the event loop), or auto: see _where


@dataclass(eq=False)
class Served:
    """One version of a model, loaded and warm, with its batcher once serving."""

    model: str
    version: str
    predictor: Predictor
    batch_on: str = "thread"  # where its batches run: "thread" or "loop"
    batcher: Batcher | None = None
    stamp: tuple | None = None  # its manifest's identity when loaded (None: not from disk)


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future
    served: Served
    request: _protocol.InferRequest
    received: float
    grpc: bool = False  # resolved with (outputs, error) for the gRPC service to encode

    @property
    def model(self) -> str:
        return self.served.model


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
        if self.config.batch_on not in ("auto", "thread", "loop"):
            raise ValueError(
                f"batch_on is {self.config.batch_on!r}; it is 'auto', 'thread' or 'loop'"
            )
        if self.config.batch_window not in ("adaptive", "fixed"):
            raise ValueError(
                f"batch_window is {self.config.batch_window!r}; it is 'adaptive' or 'fixed'"
            )
        self.policy = VersionPolicy.parse(self.config.version_policy)
        # model -> version -> Served: what requests are routed to. Changed on the loop only
        # (once serving), so a request sees one consistent table.
        self.served: dict[str, dict[str, Served]] = {}
        self._roots: list[Path] = []  # repositories, rescanned by load requests and polling
        self._failed: dict[Path, tuple[tuple, str]] = {}  # version dir -> (manifest stamp, why)
        self._unloaded: set[str] = set()  # models unloaded on request: not reloaded by polling
        self._fixed: set[str] = set()  # models given as artifacts or predictors, not rescanned
        self._sync_lock: asyncio.Lock | None = None
        for m in models:
            if isinstance(m, Predictor) or is_artifact(Path(m)):
                if isinstance(m, Predictor):  # the caller's object: used as it is
                    predictor = self._prepare(m, check=False)
                else:
                    predictor = self._prepare(self._load(Path(m)))
                self._add(self._served(predictor.name, "1", predictor))
                self._fixed.add(predictor.name)
            else:
                root = Path(m)
                self._roots.append(root)
                for name, on_disk in scan(root).items():
                    while True:  # as `sync` does: a broken version is logged and skipped
                        _, missing = self._plan(name, on_disk)
                        if not missing:
                            break
                        for v in missing:
                            entry = self._try_load(name, v, on_disk[v])
                            if entry is not None:
                                self._add(entry)
        if not self.served:
            raise ValueError(
                "give at least one artifact or repository to serve "
                f"(no model versions found in {[str(r) for r in self._roots]})"
            )
        self.metrics = Metrics(
            lambda: {
                (s.model, s.version): s.batcher.depth for s in self._all() if s.batcher is not None
            },
            lambda: len(self._connections.open) if self._connections else 0,
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
    def models(self) -> dict[str, Predictor]:
        """{model name: the predictor of its newest served version}."""
        return {name: self._newest(versions).predictor for name, versions in self.served.items()}

    def _all(self) -> list[Served]:
        return [s for versions in list(self.served.values()) for s in list(versions.values())]

    @staticmethod
    def _newest(versions: dict[str, Served]) -> Served:
        return versions[max(versions, key=int)]

    def route(self, name: str, version: str | None) -> Served:
        """The served version a request names (the newest when ``version`` is empty);
        `LookupError` with the message to answer 404 with."""
        versions = self.served.get(name)
        if not versions:
            raise LookupError(f"unknown model {name!r}; this server serves {sorted(self.served)}")
        if not version:
            return self._newest(versions)
        served = versions.get(version)
        if served is None:
            raise LookupError(
                f"model {name!r} has no version {version[:20]!r}; it serves versions "
                f"{sorted(versions, key=int)}"
            )
        return served

    # -- loading ---------------------------------------------------------------------------
    def _load(self, path: Path) -> Predictor:
        return load(path, backend=self.config.backend, allow_expired=self.config.allow_expired)

    def _prepare(
        self, predictor: Predictor, name: str | None = None, *, check: bool = True
    ) -> Predictor:
        """Bounded batch sizes, all compiled now: never an XLA compile on the request path.
        With ``check``, the artifact's check sample must give jax's answers."""
        bucketed = predictor.bucketed(self.bucket_max(predictor))
        if name is not None:
            bucketed.name = name  # a repository names models by their directories
        bucketed.warmup()
        if check:
            bucketed.self_check()  # a version that answers wrongly is never served
        return bucketed

    def _served(
        self, model: str, version: str, predictor: Predictor, stamp: tuple | None = None
    ) -> Served:
        return Served(model, version, predictor, self._where(predictor), stamp=stamp)

    def _where(self, predictor: Predictor) -> str:
        """Where the model's batches run. ``auto`` times a full batch (off the loop, at
        load): one that takes at most `LOOP_BATCH_S` runs on the event loop, where the
        hand-off to a worker thread would cost more than the run; a slower one, or any
        model without batching or with a fixed window (which waits), gets the thread."""
        c = self.config
        if c.batch_on != "auto":
            return c.batch_on
        if not c.batching or c.batch_window == "fixed":
            return "thread"
        n = self.max_batch_size(predictor)
        try:
            seconds = predictor.time_batch(n, enough=10 * LOOP_BATCH_S)
        except Exception as e:  # its requests will say what fails; the thread is safe
            log.warning("model %r: timing a batch of %d failed (%s)", predictor.name, n, e)
            return "thread"
        where = "loop" if seconds <= LOOP_BATCH_S else "thread"
        log.info(
            "model %r: a batch of %d takes %.3f ms; batches run on the %s (--batch-on auto)",
            predictor.name,
            n,
            seconds * 1e3,
            "event loop" if where == "loop" else "worker thread",
        )
        return where

    def _add(self, served: Served) -> None:
        versions = self.served.setdefault(served.model, {})
        if served.version in versions or (served.model in self._fixed):
            raise ValueError(
                f"two artifacts are model {served.model!r} version {served.version}; "
                "model names must be unique"
            )
        versions[served.version] = served

    def _start(self, served: Served) -> None:
        """Give a version its batcher (on the loop thread)."""
        loop = self._loop
        predictor = served.predictor
        self.metrics.declare(served.model, served.version)
        on_batch = lambda n: self.metrics.batch(served.model, served.version, n)
        if served.batch_on == "loop":
            served.batcher = LoopBatcher(
                predictor,
                self._resolve,
                loop=loop,
                max_batch_size=self.max_batch_size(predictor),
                max_queue=self.config.max_queue,
                on_batch=on_batch,
            )
            return
        served.batcher = Batcher(
            predictor,
            lambda results: loop.call_soon_threadsafe(self._resolve, results),
            max_batch_size=self.max_batch_size(predictor),
            max_delay_s=self.config.max_delay_ms / 1000 if self.config.batching else 0.0,
            max_queue=self.config.max_queue,
            adaptive=self.config.batch_window == "adaptive",
            on_batch=on_batch,
        )

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
        self._sync_lock = asyncio.Lock()
        for served in self._all():
            self._start(served)
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
            self._close_batchers()
            raise
        self.port = self._listener.sockets[0].getsockname()[1]
        if c.grpc_port is not None:
            await self._open_grpc(c.host, c.grpc_port)
        self._tasks = [
            loop.create_task(self._connections.sweep_forever()),
            loop.create_task(self._expire_forever()),
        ]
        if self._roots and c.poll_interval_s > 0:
            self._tasks.append(loop.create_task(self._poll_forever(c.poll_interval_s)))

    def _close_batchers(self) -> None:
        for served in self._all():
            if served.batcher is not None:
                served.batcher.close(1)

    async def _open_grpc(self, host: str, port: int) -> None:
        try:
            from jaxmint_runtime.serve import _grpc

            self._grpc, self.grpc_port = _grpc.make_server(self, host, port)
        except (ImportError, OSError) as e:
            self._listener.close()
            self._close_batchers()
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
        for served in self._all():
            served.batcher.flush()
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
        for task in self._tasks:  # no reload starts now
            task.cancel()
        async with self._sync_lock:  # nor is one under way
            for served in self._all():
                left = max(deadline - time.monotonic(), 1)
                await loop.run_in_executor(None, served.batcher.close, left)
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
            _freeze_heap()  # this process serves: what is loaded now stays
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
        if parts[1:2] == ["repository"]:
            return self._repository(request, parts[2:])
        if parts[1:2] != ["models"] or len(parts) < 3:
            return self._not_found(request)
        name, rest, version = parts[2], parts[3:], None
        if rest[:1] == ["versions"] and len(rest) >= 2:
            version, rest = rest[1], rest[2:]
        try:
            served = self.route(name, version)
        except LookupError as e:
            return error(404, str(e))
        predictor = served.predictor
        if rest == ["infer"]:
            if request.method != "POST":
                return error(405, "infer takes POST", headers=[("Allow", "POST")])
            return self._infer(served, request)
        if rest == []:
            versions = [served.version] if version else sorted(self.served[name], key=int)
            return self._get(request) or _json(200, _protocol.model_metadata(predictor, versions))
        if rest == ["ready"]:
            if self.draining:
                return self._get(request) or error(400, "the server is shutting down")
            return self._get(request) or _json(200, {"name": name, "ready": True})
        if rest == ["config"]:
            return self._get(request) or _json(200, self._model_config(served))
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

    def _model_config(self, served: Served) -> dict:
        predictor, batcher = served.predictor, served.batcher
        return {
            "name": predictor.name,
            "platform": f"jaxmint/{predictor.backend_name}",
            "max_batch_size": batcher.max_batch_size,
            "batch_on": served.batch_on,
            "dynamic_batching": {
                "max_queue_delay_microseconds": int(batcher.max_delay_s * 1e6),
                "max_queue_size": batcher.max_queue,
            }
            if self.config.batching
            else None,
            "declared_batch_sizes": predictor.batch_sizes,
            "batch_buckets": predictor.buckets,
            "version_policy": str(self.policy),
            "input": _protocol.model_metadata(predictor)["inputs"],
            "output": _protocol.model_metadata(predictor)["outputs"],
        }

    # -- the repository (Triton's model repository extension) ---------------------------------
    def _repository(self, request: Request, parts: list[str]) -> Response | asyncio.Future:
        if request.method != "POST":
            return error(405, "repository requests take POST", headers=[("Allow", "POST")])
        if parts == ["index"]:
            return asyncio.ensure_future(self._index(request.body))
        if len(parts) == 3 and parts[0] == "models" and parts[2] in ("load", "unload"):
            action = self._load_model if parts[2] == "load" else self._unload_model
            return asyncio.ensure_future(action(parts[1]))
        return self._not_found(request)

    async def _index(self, body: bytes) -> Response:
        try:
            query = json.loads(body) if body.strip() else {}
        except ValueError:
            query = None
        if not isinstance(query, dict) or not isinstance(query.get("ready", False), bool):
            return error(400, 'the index request body is empty or {"ready": true|false}')
        on_disk = await self._scan()
        entries = []
        for name in sorted(set(on_disk) | set(self.served)):
            served = self.served.get(name, {})
            versions = set(served) | {str(v) for v in on_disk.get(name, {})}
            for version in sorted(versions, key=int):
                if version in served:
                    entry = {"name": name, "version": version, "state": "READY"}
                    path = on_disk.get(name, {}).get(int(version))
                    why = self._failure(path) if path is not None else None
                    if why:  # rewritten in place, and the rewrite did not load
                        entry["reason"] = f"the previous export serves; the rewrite failed: {why}"
                    entries.append(entry)
                elif not query.get("ready", False):
                    path = on_disk[name][int(version)]
                    reason = self._failure(path) or (
                        "unloaded on request"
                        if name in self._unloaded
                        else f"not chosen by the version policy {self.policy}"
                    )
                    entries.append(
                        {"name": name, "version": version, "state": "UNAVAILABLE", "reason": reason}
                    )
        return _json(200, entries)

    async def _load_model(self, name: str) -> Response:
        if name in self._fixed:
            return _json(200, {})  # given as an artifact: loaded for the server's lifetime
        if not self._roots:
            return error(400, "this server serves artifacts, not a repository: nothing to load")
        self._unloaded.discard(name)
        await self.sync(only=name)
        if name not in self.served:
            versions = (await self._scan()).get(name)
            if not versions:
                return error(400, f"the repository has no model {name!r} (no ROOT/{name}/N/)")
            reasons = [self._failure(p) for p in versions.values()]
            return error(400, f"model {name!r} failed to load: {'; '.join(filter(None, reasons))}")
        return _json(200, {})

    async def _unload_model(self, name: str) -> Response:
        if name in self._fixed:
            return error(
                400,
                f"model {name!r} was given as an artifact; only a repository's "
                "models can be unloaded",
            )
        if name not in self.served and name not in await self._scan():
            return error(400, f"unknown model {name!r}; this server serves {sorted(self.served)}")
        self._unloaded.add(name)
        async with self._sync_lock:
            await self._retire(name, list(self.served.get(name, {})))
        return _json(200, {})

    async def sync(self, only: str | None = None) -> None:
        """Serve what the repositories hold now: load the versions the policy picks, retire
        the others. A version that fails to load is logged and skipped (the versions
        served keep serving) until its manifest changes. Runs on the server's loop."""
        async with self._sync_lock:
            if self.draining:
                return
            on_disk = await self._scan()
            for name in sorted(set(on_disk) | set(self.served)):
                if name in self._fixed or (only is not None and name != only):
                    continue
                if name in self._unloaded or name not in on_disk:
                    await self._retire(name, list(self.served.get(name, {})))
                else:
                    await self._sync_model(name, on_disk[name])

    def _plan(self, name: str, on_disk: dict[int, Path]) -> tuple[list[int], list[int]]:
        """The versions of ``name`` to serve, and those of them not loaded yet."""
        served = self.served.get(name, {})
        usable = [v for v, path in on_disk.items() if str(v) in served or not self._failure(path)]
        wanted = self.policy.select(usable)
        return wanted, [v for v in wanted if str(v) not in served]

    def _refuse(self, name: str, version: int, path: Path, e: Exception, stamp) -> None:
        self._failed[path] = (stamp, str(e)[:2000])
        log.warning(
            "model %r version %d at %s not loaded (the versions served keep serving): %s",
            name,
            version,
            path,
            e,
        )

    async def _sync_model(self, name: str, on_disk: dict[int, Path]) -> None:
        loop = asyncio.get_running_loop()
        replaced = await self._reload_rewritten(name, on_disk)
        while True:
            wanted, missing = self._plan(name, on_disk)
            if not missing:
                break
            for v in missing:
                entry = await loop.run_in_executor(None, self._try_load, name, v, on_disk[v])
                if entry is None:
                    continue
                self._start(entry)
                self.served.setdefault(name, {})[str(v)] = entry
                log.info("model %r version %d loaded from %s", name, v, on_disk[v])
                _refreeze()
        stale = [v for v in self.served.get(name, {}) if int(v) not in wanted]
        await self._retire(name, stale, replaced=replaced)

    async def _reload_rewritten(self, name: str, on_disk: dict[int, Path]) -> int:
        """Versions served whose directory was rewritten in place (a new export with
        --force): the new one is loaded, checked and warmed beside the old, then takes
        its place in the table; the old answers what it queued. A rewrite that fails
        to load leaves the old one serving. Returns how many were replaced."""
        loop = asyncio.get_running_loop()
        replaced = 0
        for version, old in list(self.served.get(name, {}).items()):
            path = on_disk.get(int(version))
            if old.stamp is None or path is None or _stamp(path) == old.stamp:
                continue
            if self._failure(path):
                continue
            new = await loop.run_in_executor(None, self._try_load, name, int(version), path)
            if new is None:
                continue
            self._start(new)
            self.served[name][version] = new  # from here on, requests go to the new one
            _refreeze()
            # Said when it takes effect, before the old one drains what it queued.
            log.info(
                "model %r version %s reloaded from %s (rewritten in place)", name, version, path
            )
            await loop.run_in_executor(None, old.batcher.close, self.config.drain_timeout_s)
            replaced += 1
        return replaced

    def _try_load(self, name: str, version: int, path: Path) -> Served | None:
        """Load, check and warm one version (no batcher yet); None, logged, if it fails."""
        stamp = _stamp(path)  # before reading: a rewrite during the load is seen next time
        try:
            predictor = self._prepare(self._load(path), name)
        except Exception as e:  # a broken version never replaces a working one
            self._refuse(name, version, path, e, stamp)
            return None
        self._failed.pop(path, None)
        return self._served(name, str(version), predictor, stamp)

    async def _retire(self, name: str, versions: list[str], *, replaced: int = 0) -> None:
        """Stop routing to ``versions``, then answer what they queued and let them go;
        their memory, and that of ``replaced`` versions rewritten in place, is collected."""
        loop = asyncio.get_running_loop()
        for version in versions:
            served = self.served[name].pop(version)
            if not self.served[name]:
                del self.served[name]
            await loop.run_in_executor(None, served.batcher.close, self.config.drain_timeout_s)
            log.info("model %r version %s unloaded", name, version)
        if versions or replaced:
            await loop.run_in_executor(None, _collect)

    async def _scan(self) -> dict[str, dict[int, Path]]:
        loop = asyncio.get_running_loop()
        found: dict[str, dict[int, Path]] = {}
        for root in self._roots:
            try:
                models = await loop.run_in_executor(None, scan, root)
            except (OSError, RepositoryError) as e:
                log.warning("repository %s cannot be read: %s", root, e)
                continue
            for name, versions in models.items():
                found.setdefault(name, versions)
        return found

    def _failure(self, path: Path) -> str | None:
        """Why ``path`` did not load, unless its manifest changed since."""
        failed = self._failed.get(path)
        return failed[1] if failed and failed[0] == _stamp(path) else None

    async def _poll_forever(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            try:
                await self.sync()
            except Exception:  # a poll that fails is logged; serving goes on
                log.exception("repository poll failed")

    # -- infer --------------------------------------------------------------------------------
    def _infer(self, served: Served, request: Request) -> Response | asyncio.Future:
        predictor, name, version = served.predictor, served.model, served.version
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
            self.metrics.infer(name, version, e.status)
            return error(e.status, str(e))
        future = self._loop.create_future()
        pending = _Pending(future, served, decoded, request.received)
        try:
            served.batcher.submit(decoded.arrays, decoded.batch, pending)
        except QueueFull as e:
            self.metrics.infer(name, version, 503)
            return error(503, str(e), headers=[("Retry-After", "1")])
        self._pending.add(pending)
        return future

    async def submit(
        self, served: Served, request: _protocol.InferRequest, received: float
    ) -> dict:
        """Run a decoded request through the version's batcher; its outputs (for gRPC).

        Raises `QueueFull`, or `ProtocolError` with status 500 (the model failed) or
        504 (no answer within ``request_timeout_s``).
        """
        future = self._loop.create_future()
        pending = _Pending(future, served, request, received, grpc=True)
        served.batcher.submit(request.arrays, request.batch, pending)
        self._pending.add(pending)
        answer = await future
        if isinstance(answer, Response):  # expired
            raise _protocol.ProtocolError(json.loads(answer.body)["error"], answer.status)
        outputs, exc = answer
        if exc is not None:
            raise _protocol.ProtocolError(f"model {served.model!r} failed: {exc}", 500)
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
                served = pending.served
                if exc is None:
                    seconds = time.monotonic() - pending.received
                    self.metrics.infer(served.model, served.version, 200, seconds)
                else:
                    self.metrics.infer(served.model, served.version, 500)
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
        served = pending.served
        body, header_length = _protocol.encode_infer(
            served.model, pending.request, outputs, served.predictor.labels, served.version
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
        self.metrics.infer(pending.served.model, pending.served.version, response.status, seconds)
        pending.future.set_result(response)


# -- the garbage collector ----------------------------------------------------------------
# A serving process holds a large heap that lives as long as it does: jax, numpy, the
# loaded models. Python's full collections walk all of it, holding the GIL, and under
# load each one stalls every request in flight. `serve_forever` freezes that heap once
# the models are loaded and warm (`gc.freeze`): full collections then walk only what
# was made since. Objects frozen are still freed when nothing refers to them; only
# cycles among them wait for `_collect`, which unloading or replacing a version runs.
def _freeze_heap() -> None:
    """Collect, then freeze what is alive."""
    gc.collect()
    gc.freeze()
    log.info(
        "froze %d objects out of the garbage collector's full collections", gc.get_freeze_count()
    )


def _refreeze() -> None:
    """Freeze a version just loaded too, when this process froze its heap."""
    if gc.get_freeze_count():
        gc.freeze()


def _collect() -> None:
    """A full collection that also reaches frozen objects (an unloaded version's)."""
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()


def _stamp(path: Path) -> tuple:
    """The identity of a version's manifest: a rewrite (a new file, or new bytes) changes it."""
    try:
        info = os.stat(path / "manifest.json")
    except OSError:
        return ()
    return (info.st_ino, info.st_mtime_ns, info.st_size)


def _json(status: int, obj) -> Response:
    return Response(status, json.dumps(obj, separators=(",", ":")).encode())
