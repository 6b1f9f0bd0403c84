"""The HTTP parser under `jaxmint-serve`: llhttp (httptools) against h11, side by side.

Run (about 20 seconds; ``--quick`` is a one-second smoke run)::

    python benchmarks/http_parsers.py

Both parse the same infer request (a v2 JSON body for one digits example, as
tritonclient sends it) from bytes to the end of its body, in one process,
interleaved round by round, medians over rounds. Target: the parser the server
uses (llhttp) costs at most **0.25** of h11's time per request; that is why it
was chosen. Also reported: the whole transport per request (`HttpProtocol` with
llhttp, a do-nothing application and a null socket), the cost the server adds
to every request before the model runs. Writes benchmarks/results/http_parsers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import h11
import httptools
from _common import environment, med, table, write_result

from jaxmint_runtime.serve import _http

RESULTS = Path(__file__).parent / "results"
BODY = json.dumps(
    {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}]}
).encode()
REQUEST = (
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY


class _Callbacks:
    def on_url(self, url): ...
    def on_header(self, name, value): ...
    def on_body(self, body): ...
    def on_message_complete(self): ...


def parse_llhttp(n: int) -> None:
    callbacks = _Callbacks()
    for _ in range(n):
        httptools.HttpRequestParser(callbacks).feed_data(REQUEST)


def parse_h11(n: int) -> None:
    for _ in range(n):
        conn = h11.Connection(h11.SERVER)
        conn.receive_data(REQUEST)
        while type(conn.next_event()) is not h11.EndOfMessage:
            pass


class _NullTransport:
    def write(self, data): ...
    def close(self): ...
    def pause_reading(self): ...
    def resume_reading(self): ...
    def get_extra_info(self, name):
        return ("127.0.0.1", 1)


class _App:
    answer = _http.Response(200, b'{"ok":true}')

    def admit(self, request):
        return None

    def handle(self, request):
        return self.answer

    def responded(self, status): ...


def transport(n: int) -> None:
    protocol = _http.Connections(_App(), _http.Limits()).protocol()
    protocol.connection_made(_NullTransport())
    for _ in range(n):
        protocol.data_received(REQUEST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS / "http_parsers.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    rounds, n = (2, 500) if args.quick else (9, 5000)
    variants = {"llhttp": parse_llhttp, "h11": parse_h11, "transport (llhttp)": transport}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            variants[name](n)
            times[name].append((time.perf_counter() - t0) / n * 1e6)
    us = {k: med(v) for k, v in times.items()}
    ratio = us["llhttp"] / us["h11"]
    rows = [[k, f"{v:.2f}"] for k, v in us.items()]
    print(table(f"microseconds per request, medians of {rounds} rounds", ["", "us"], rows))
    verdict = "met" if ratio <= 0.25 else "MISSED"
    print(f"\nllhttp / h11 time per request: {ratio:.3f} (target <= 0.25: {verdict})")
    result = {
        "us_per_request": us,
        "llhttp_over_h11": ratio,
        "request_bytes": len(REQUEST),
        "environment": {**environment(), "load_average_at_start": load_before},
    }
    write_result(result, args.out, load_before)


if __name__ == "__main__":
    main()
