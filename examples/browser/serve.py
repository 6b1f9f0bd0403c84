"""Serve the browser demo on loopback: the page, jaxmint-runtime-js, ONNX Runtime Web
and one artifact.

    python examples/browser/serve.py artifacts/digits_mlp   # then open the printed URL

Paths: ``/`` this folder, ``/lib/`` export/js/dist (``npm run build`` there),
``/ort/`` onnxruntime-web's files, ``/artifact/`` the artifact directory. Only
files under those folders are served (the standard library's handler resolves
``..`` before the prefix is mapped); no directory listings.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import os
import threading
from pathlib import Path
from typing import ClassVar

HERE = Path(__file__).resolve().parent
JS = HERE.parents[1] / "export/js"


class Handler(http.server.SimpleHTTPRequestHandler):
    extensions_map: ClassVar[dict[str, str]] = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }

    def __init__(self, *args, roots: dict[str, Path], **kwargs):
        self.roots = roots
        super().__init__(*args, directory=str(roots["/"]), **kwargs)

    def translate_path(self, path: str) -> str:
        plain = super().translate_path(path)  # normalized under roots["/"]
        rel = Path(plain).relative_to(self.roots["/"]).as_posix()
        for prefix, root in self.roots.items():
            name = prefix.strip("/")
            if name and (rel == name or rel.startswith(name + "/")):
                return str(root / rel[len(name) :].lstrip("/"))
        return plain

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        super().end_headers()

    def log_message(self, format, *args):
        if os.environ.get("JAXMINT_DEMO_LOG"):
            super().log_message(format, *args)


def make_server(artifact: str | os.PathLike, port: int = 0) -> http.server.ThreadingHTTPServer:
    """A server on 127.0.0.1 (``port=0``: any free port); call ``serve_forever``."""
    roots = {
        "/": HERE,
        "/lib/": JS / "dist",
        "/ort/": JS / "node_modules/onnxruntime-web/dist",
        "/artifact/": Path(artifact).resolve(),
    }
    missing = [str(p) for p in roots.values() if not p.is_dir()]
    if missing:
        raise SystemExit(
            f"missing {missing}: run `npm ci && npm run build` in export/js, and give an "
            "artifact directory exported with --target onnx"
        )
    return http.server.ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(Handler, roots=roots)
    )


def serve_in_thread(artifact) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = make_server(artifact)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", help="an artifact directory with the onnx target")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    server = make_server(args.artifact, args.port)
    print(f"open http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops)")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
