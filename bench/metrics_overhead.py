"""`python -m bench.metrics_overhead`: what metrics add to one HTTP request, in process.

Whole-service runs (`--targets ours,ours-nometrics`) differ by 10-30% from run to run on
a shared two-core machine, far more than the 3% that issue 11 allows, so they cannot show
the cost either way. The only per-request work that metrics add is in the outermost
middleware: `RequestObserver` (metrics on) against `RequestIds` (metrics off); the counters
on the hot paths are the same plain integer adds either way, and the loop-lag sampler runs
twice a second. This drives each middleware around a minimal ASGI answer, alternating,
`--rounds` times, and prints the median µs per request of each and their difference, also
as a share of the service's CPU per sendEvent (`--service-us-per-call`, from a bench run's
"service CPU ms per 1,000 calls" row).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import uvloop

from http_bridge.commands import PREFIX
from observability.requests import HttpStats, RequestIds, RequestObserver

SEND_EVENT_PATH = f"{PREFIX}/sendEvent"

_ANSWER_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"1")]


async def _app(scope: object, receive: object, send: object) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": list(_ANSWER_HEADERS)})  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"1"})  # type: ignore[operator]


async def _receive() -> dict[str, object]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: object) -> None:
    return None


async def _per_request_us(middleware: object, requests: int) -> float:
    scope = {"type": "http", "path": SEND_EVENT_PATH, "method": "POST",
             "headers": [(b"authorization", b"Bearer x"), (b"content-type", b"application/json")]}
    started = time.perf_counter()
    for _ in range(requests):
        await middleware(scope, _receive, _send)  # type: ignore[operator]
    return (time.perf_counter() - started) / requests * 1e6


async def measure(rounds: int, requests: int) -> tuple[list[float], list[float]]:
    observed = RequestObserver(_app, HttpStats([SEND_EVENT_PATH]))
    plain = RequestIds(_app)
    on: list[float] = []
    off: list[float] = []
    for _ in range(rounds):
        on.append(await _per_request_us(observed, requests))
        off.append(await _per_request_us(plain, requests))
    return on, off


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_overhead", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=100_000, help="requests per round and middleware")
    parser.add_argument("--service-us-per-call", type=float, default=0.0,
                        help="the service's CPU per sendEvent, in µs, to express the cost as a share of it")
    arguments = parser.parse_args()
    on, off = uvloop.run(measure(arguments.rounds, arguments.requests))
    on_us, off_us = statistics.median(on), statistics.median(off)
    print(f"metrics on  (RequestObserver): {on_us:.2f} µs per request [{min(on):.2f}-{max(on):.2f}]")
    print(f"metrics off (RequestIds):      {off_us:.2f} µs per request [{min(off):.2f}-{max(off):.2f}]")
    print(f"metrics add {on_us - off_us:.2f} µs per request ({arguments.rounds} rounds, medians)")
    if arguments.service_us_per_call > 0:
        share = (on_us - off_us) / arguments.service_us_per_call * 100
        print(f"= {share:.1f}% of {arguments.service_us_per_call:.0f} µs of service CPU per sendEvent")
    return 0


if __name__ == "__main__":
    sys.exit(main())
