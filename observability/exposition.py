"""Serving the metrics: GET /metrics on the HTTP port, or on a listener of its own.

The separate listener (--metrics-port) runs on the service's own event loop, not in a
thread, because the collector reads counters and the table that only the loop may touch.
It answers GET /metrics and nothing else, one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from http_bridge.openapi import METRICS_PATH

log = logging.getLogger("endpoint_broker.metrics")

MAX_REQUEST_HEAD_BYTES = 8 * 1024
READ_TIMEOUT_SECONDS = 10.0


def metrics_route(registry: CollectorRegistry) -> object:
    async def metrics(request: Request) -> Response:
        """The Prometheus text format. No token: it binds where the HTTP port binds (loopback by default)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


class MetricsListener:
    """A plain HTTP/1.1 listener for GET /metrics, on the loop."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True,
                                                  limit=MAX_REQUEST_HEAD_BYTES)
        log.info("metrics at http://%s:%d%s", self.host, self.port, METRICS_PATH)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_SECONDS):
                head = await reader.readuntil(b"\r\n\r\n")
            status, body, content_type = self._answer(head)
            writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                         % (status, b"OK" if status == 200 else b"Not Found", content_type.encode(), len(body)))
            writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a scanner or a dead peer: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, bytes, str]:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method in (b"GET", b"HEAD") and path == METRICS_PATH.encode():
            body = generate_latest(self.registry)
            return 200, b"" if method == b"HEAD" else body, CONTENT_TYPE_LATEST
        return 404, b"not found\n", "text/plain; charset=utf-8"
