"""``jaxmint-serve``: the Open Inference Protocol v2 REST API over jaxmint artifacts.

Serves `KServe v2 <https://kserve.github.io/website/docs/concepts/architecture/data-plane/v2-protocol>`_
health, metadata and infer endpoints with Triton's binary tensor extension (so
``tritonclient.http`` works with its defaults), dynamic batching, a bounded
queue, bearer-token auth, Prometheus metrics and a graceful drain on SIGTERM.
See docs/serving.md.

Example::

    from jaxmint_runtime.serve import Server

    with Server(["artifacts/digits"], port=0) as server:
        print(server.url)   # POST {url}/v2/models/digits/infer
"""

from jaxmint_runtime.serve._cli import main as main
from jaxmint_runtime.serve._protocol import ProtocolError as ProtocolError
from jaxmint_runtime.serve._server import ServeConfig as ServeConfig
from jaxmint_runtime.serve._server import Server as Server

__all__ = ["ProtocolError", "ServeConfig", "Server", "main"]
