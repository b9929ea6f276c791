"""HTTP connections that cannot exhaust the process: a deadline per request, a cap, a reserve.

uvicorn reads no request within a deadline: an idle socket, headers sent one
byte a second (slowloris) or a body shorter than its Content-Length are kept
forever, and each holds a file descriptor. Enough of them and the MQTT
listener's accept() fails too. `guarded_protocol` makes uvicorn's httptools
protocol:

- close a connection whose request has not arrived whole (headers and body)
  within `request_timeout_seconds` of the connection opening or of the previous
  response ending (uvicorn's own keep-alive timeout, 5 s, still closes idle
  keep-alive connections sooner). An upgraded WebSocket (/ws) is no longer an
  HTTP request: it has no deadline, MQTT's keep-alive governs it;
- hold at most `max_connections` connections. uvicorn counts HTTP and WebSocket
  connections together, so /ws connections count against the cap;
- beyond the cap, keep HEALTH_OVERFLOW more connections for GET /healthz only,
  with a short deadline and one request each: anything else gets a 503 problem
  and the connection is closed. Connections beyond that are closed at once.

uvicorn's `limit_concurrency` is not used: over its limit it answers 503 to
every request, /healthz included, and still keeps the sockets.

The cap is also kept below the process's open-file limit, less a reserve of
descriptors (`fd_reserve`), so that MQTT connections, /healthz and the log
files keep working while HTTP is saturated (see `max_connections_for`).

It also writes each response with one system call: uvicorn writes the head
and the body separately, and a send() is the dearest step of a sendEvent
(`CoalescedWrites`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from http_bridge.openapi import HEALTH_PATH
from http_bridge.problems import PROBLEM_JSON, problem_body

log = logging.getLogger("endpoint_broker.http")

# Connections allowed above the cap, for GET /healthz only.
HEALTH_OVERFLOW = 16
# How long an over-cap connection may take to send its /healthz request.
OVERFLOW_DEADLINE_SECONDS = 2.0
# Descriptors HTTP never takes: at least this many, or a tenth of the limit.
MIN_FD_RESERVE = 64

_OVER_CAPACITY = problem_body(503, "Service unavailable", "too many HTTP connections; retry later")


def fd_reserve(file_limit: int) -> int:
    return max(MIN_FD_RESERVE, file_limit // 10)


def max_connections_for(configured: int, file_limit: int | None) -> int:
    """The HTTP connection cap: `configured`, but never into the descriptors kept for MQTT and /healthz."""
    if file_limit is None:
        return configured
    return max(1, min(configured, file_limit - fd_reserve(file_limit) - HEALTH_OVERFLOW))


class EndOfIteration:
    """Flushes, at the end of the loop iteration, every CoalescedWrites written to in it.

    One call_soon per iteration for all connections, not one per response: a response that
    completes flushes itself at once (on_response_complete), so this is the backstop for a
    response still being streamed.
    """

    __slots__ = ("_dirty", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._dirty: list[CoalescedWrites] = []

    def mark(self, writes: CoalescedWrites) -> None:
        if not self._dirty:
            self.loop.call_soon(self._flush_all)
        self._dirty.append(writes)

    def _flush_all(self) -> None:
        dirty, self._dirty = self._dirty, []
        for writes in dirty:
            writes.flush()


class CoalescedWrites:
    """A transport whose writes within one loop iteration leave as one `write`.

    Flushed when a response completes, before a close, and at the end of the iteration
    (EndOfIteration); `abort` drops what is pending, as the real transport would. Everything
    else is the real transport's.
    """

    __slots__ = ("_end_of_iteration", "_pending", "transport")

    def __init__(self, transport: asyncio.Transport, end_of_iteration: EndOfIteration) -> None:
        self.transport = transport
        self._end_of_iteration = end_of_iteration
        self._pending: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending is None:
            self._pending = bytes(data)
            self._end_of_iteration.mark(self)
        else:
            self._pending += data

    def flush(self) -> None:
        data, self._pending = self._pending, None
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._pending = None
        self.transport.abort()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


def guarded_protocol(*, request_timeout_seconds: float, max_connections: int) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a request deadline and a connection cap (pass as `http=`)."""

    class GuardedHttpProtocol(HttpToolsProtocol):
        # One timer per connection, re-armed only when it fires early: moving a deadline is a
        # float store, not a new TimerHandle per request (a keep-alive client makes thousands).
        _timer: asyncio.TimerHandle | None = None
        _deadline_at: float | None = None  # None: no request in progress
        _over_capacity = False
        _end_of_iteration: EndOfIteration | None = None  # the server's one, in its loop

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            shared = GuardedHttpProtocol._end_of_iteration
            if shared is None or shared.loop is not self.loop:
                shared = GuardedHttpProtocol._end_of_iteration = EndOfIteration(self.loop)
            self.transport = CoalescedWrites(transport, shared)  # type: ignore[assignment]
            open_connections = len(self.connections)  # this one included, WebSockets too
            if open_connections > max_connections + HEALTH_OVERFLOW:
                transport.abort()  # frees the descriptor now; nothing is read or written
                return
            if open_connections > max_connections:
                self._over_capacity = True
                self.app = health_only(self.app)
                self._arm(min(OVERFLOW_DEADLINE_SECONDS, request_timeout_seconds))
            else:
                self._arm(request_timeout_seconds)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            super().connection_lost(exc)

        def on_message_complete(self) -> None:
            super().on_message_complete()
            if self.cycle is not None and self.cycle.response_complete:
                # Answered before the body ended (401, 413): the connection is idle again.
                self._arm(request_timeout_seconds)
            else:
                self._disarm()  # the request is whole: the app may take its time

        def on_response_complete(self) -> None:
            self.transport.flush()  # type: ignore[attr-defined]  # the whole response, now
            pipelined = bool(self.pipeline)  # the next request has already arrived whole
            super().on_response_complete()
            if not pipelined and not self.transport.is_closing():
                self._arm(request_timeout_seconds)

        def handle_websocket_upgrade(self) -> None:
            if self._over_capacity:
                _write_over_capacity(self.transport)
                return
            self._disarm()  # an established WebSocket is not a request in progress
            coalesced = self.transport
            if isinstance(coalesced, CoalescedWrites):
                coalesced.flush()
                self.transport = coalesced.transport  # the WebSocket protocol writes frames itself
            super().handle_websocket_upgrade()

        def _arm(self, seconds: float) -> None:
            self._deadline_at = deadline = self.loop.time() + seconds
            if self._timer is None or self._timer.when() > deadline:
                if self._timer is not None:
                    self._timer.cancel()
                self._timer = self.loop.call_at(deadline, self._deadline_check)

        def _disarm(self) -> None:
            self._deadline_at = None

        def _deadline_check(self) -> None:
            self._timer = None
            deadline = self._deadline_at
            if deadline is None:
                return  # no request in progress; the next _arm starts a timer
            if self.loop.time() < deadline:
                self._timer = self.loop.call_at(deadline, self._deadline_check)  # moved later meanwhile
            elif not self.transport.is_closing():
                self.transport.close()

    return GuardedHttpProtocol


def health_only(app: Any) -> Any:
    """An over-cap connection may ask for /healthz; anything else gets a 503."""

    async def serve(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == HEALTH_PATH:
            async def send_then_close(message: Any) -> None:
                if message["type"] == "http.response.start":
                    # One request, then the descriptor is free again: uvicorn closes after an
                    # answer that says so (set here, so that no other request pays for a check).
                    message["headers"] = [*message.get("headers", ()), (b"connection", b"close")]
                await send(message)

            await app(scope, receive, send_then_close)
            return
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(_OVER_CAPACITY)).encode()),
            (b"retry-after", b"1"), (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": _OVER_CAPACITY})

    return serve


def _write_over_capacity(transport: asyncio.Transport) -> None:
    transport.write(
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: " + PROBLEM_JSON.encode()
        + b"\r\ncontent-length: " + str(len(_OVER_CAPACITY)).encode()
        + b"\r\nretry-after: 1\r\nconnection: close\r\n\r\n" + _OVER_CAPACITY
    )
    transport.close()
