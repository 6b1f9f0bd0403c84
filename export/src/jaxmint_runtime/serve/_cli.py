"""The ``jaxmint-serve`` command: parse flags, load artifacts, serve until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jaxmint_runtime._format import ArtifactError
from jaxmint_runtime.backends import BACKENDS
from jaxmint_runtime.serve._server import TOKEN_ENV, ServeConfig, Server

_D = ServeConfig()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxmint-serve",
        description="Serve jaxmint artifacts over the Open Inference Protocol v2 (KServe v2) "
        "REST API, with Triton's binary tensor extension and dynamic batching.",
    )
    p.add_argument(
        "artifacts",
        nargs="+",
        metavar="DIR",
        help="artifact directories, or model repositories laid out as DIR/MODEL/VERSION/",
    )
    p.add_argument(
        "--version-policy",
        default=_D.version_policy,
        help="which versions of a repository's models to serve: latest:N, all, or "
        "specific:V1,V2 (default %(default)s)",
    )
    p.add_argument(
        "--poll-interval",
        type=float,
        default=_D.poll_interval_s,
        metavar="SECONDS",
        help="rescan repositories this often, loading new versions and retiring old ones "
        "(default 0: only on POST /v2/repository/models/NAME/load)",
    )
    p.add_argument("--host", default=_D.host, help="address to bind (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=_D.port, help="port; 0 picks a free one (default %(default)s)"
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="port of the gRPC service (inference.GRPCInferenceService); 0 picks a free one "
        "(default: 8001 when the [grpc] extra is installed; a free one with --port 0)",
    )
    p.add_argument("--no-grpc", action="store_true", help="serve REST only")
    p.add_argument(
        "--batch-on",
        choices=["auto", "thread", "loop"],
        default=_D.batch_on,
        help="where a model's batches run: on a worker thread per model, or on the event "
        "loop itself (no hand-off, for models whose batch takes microseconds); auto (the "
        "default) times a full batch at load and picks the loop when it takes under "
        "0.5 ms, else the thread (always the thread with --no-batching or a fixed window)",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        default=None,
        help="most examples per merged batch (default: the model's largest declared "
        "batch size, or 32)",
    )
    p.add_argument(
        "--max-delay-ms",
        type=float,
        default=_D.max_delay_ms,
        help="longest wait for a batch to fill (default %(default)s)",
    )
    p.add_argument(
        "--batch-window",
        choices=["adaptive", "fixed"],
        default=_D.batch_window,
        help="adaptive (default): a lone request runs at once and a batch stops waiting once "
        "it holds as many requests as the one before; fixed: every batch waits up to "
        "--max-delay-ms to fill (for devices where a batch costs far more than an example)",
    )
    p.add_argument(
        "--no-batching", dest="batching", action="store_false", help="run every request on its own"
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=_D.max_queue,
        help="requests waiting per model before answering 503 (default %(default)s)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=_D.max_body_bytes,
        help="largest request body, 413 above (default %(default)s)",
    )
    p.add_argument(
        "--max-elements",
        type=int,
        default=_D.max_elements,
        help="most elements one input tensor may declare (default %(default)s)",
    )
    p.add_argument(
        "--token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' (default: ${TOKEN_ENV} if set; "
        "prefer the variable: flags show in the process list)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=_D.request_timeout_s,
        help="seconds before an unanswered infer gets 504 (default %(default)s)",
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=_D.drain_timeout_s,
        help="seconds to finish in-flight requests after SIGTERM (default %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=_D.idle_timeout_s,
        help="seconds before an idle keep-alive connection is closed (default %(default)s)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=_D.max_connections,
        help="open connections before new ones get 503 (default %(default)s)",
    )
    p.add_argument(
        "--max-connections-per-client",
        type=int,
        default=_D.max_connections_per_client,
        help="open connections from one address before new ones get 429 (default %(default)s)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *BACKENDS],
        help="engine that runs the artifact: auto picks the first of xla, onnx, iree that "
        "the artifact has and this environment installs ($JAXMINT_BACKEND replaces that order)",
    )
    p.add_argument(
        "--allow-expired",
        action="store_true",
        help="load artifacts past their jax.export compatibility window",
    )
    p.add_argument("--log-level", default="INFO", help="logging level (default %(default)s)")
    return p


DEFAULT_GRPC_PORT = 8001


def _grpc_port(asked: int | None, http_port: int) -> int | None:
    """The gRPC port: as asked (the extra must be there), or if the extra is installed 8001
    (any free port when the HTTP port is 0: several servers on one machine, as in tests)."""
    if asked is not None:
        return asked
    try:
        import grpc  # noqa: F401
    except ImportError:
        logging.info("gRPC is off: pip install 'jaxmint-runtime[grpc]' to serve it")
        return None
    return 0 if http_port == 0 else DEFAULT_GRPC_PORT


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s"
    )
    for name, value in [
        ("--max-queue", args.max_queue),
        ("--max-body-bytes", args.max_body_bytes),
        ("--max-elements", args.max_elements),
        ("--max-connections", args.max_connections),
        ("--max-connections-per-client", args.max_connections_per_client),
        ("--max-batch-size", args.max_batch_size or 1),
    ]:
        if value < 1:
            print(f"jaxmint-serve: {name} must be at least 1, got {value}", file=sys.stderr)
            return 2
    if args.poll_interval < 0:
        print("jaxmint-serve: --poll-interval must be at least 0", file=sys.stderr)
        return 2
    grpc_port = None if args.no_grpc else _grpc_port(args.grpc_port, args.port)
    config = ServeConfig(
        host=args.host,
        port=args.port,
        grpc_port=grpc_port,
        batching=args.batching,
        max_batch_size=args.max_batch_size,
        max_delay_ms=args.max_delay_ms,
        batch_window=args.batch_window,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_elements=args.max_elements,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.drain_timeout,
        idle_timeout_s=args.idle_timeout,
        max_connections=args.max_connections,
        max_connections_per_client=args.max_connections_per_client,
        version_policy=args.version_policy,
        poll_interval_s=args.poll_interval,
        backend=args.backend,
        allow_expired=args.allow_expired,
        batch_on=args.batch_on,
    )
    try:
        server = Server(args.artifacts, config)
    except (ArtifactError, OSError, ValueError) as e:
        print(f"jaxmint-serve: {e}", file=sys.stderr)
        return 2

    def ready(s: Server) -> None:
        for name, versions in s.served.items():
            for version, served in versions.items():
                predictor = served.predictor
                how = (
                    f"batches up to {s.max_batch_size(predictor)} examples, "
                    f"{config.max_delay_ms:g} ms delay"
                    if config.batching
                    else "no batching"
                )
                logging.info(
                    "model %r version %s (%s backend): %s",
                    name,
                    version,
                    predictor.backend_name,
                    how,
                )
        # One parseable line on stdout: scripts started with --port 0 read the port from it.
        print(f"jaxmint-serve: listening on {s.url}", flush=True)
        if s.grpc_port is not None:
            print(f"jaxmint-serve: gRPC listening on {config.host}:{s.grpc_port}", flush=True)

    try:
        drained = server.serve_forever(on_ready=ready)
    except ImportError as e:  # --grpc-port without the [grpc] extra
        print(f"jaxmint-serve: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the address is taken, or not ours to bind
        print(f"jaxmint-serve: cannot listen on {config.host}:{config.port} ({e})", file=sys.stderr)
        return 2
    logging.info("stopped (%s)", "all requests answered" if drained else "drain timed out")
    return 0 if drained else 1
