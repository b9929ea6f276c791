"""The live endpoints page: GET /dashboard (static HTML + JS) and its stream, GET /dashboard/events.

The stream is Server-Sent Events over a plain GET with `Authorization: Bearer <SERVICE token>`
(the page reads it with fetch() and a streaming reader: EventSource cannot send headers):

- `event: snapshot`: `{"endpoints": [...]}`, every endpoint the caller may see (a SERVICE
  token with an organisation sees that organisation, one without sees all), each a
  UserEndpointView plus `transport`; first, then every `snapshot_interval_seconds`
  (which also refreshes the "last keepalive" ages);
- `event: lifecycle`: one lifecycle event (endpoint_core.lifecycle), as it happens.

Bounds: at most `max_streams` streams at once (more get a 503), and each stream queues at most
`stream_queue_events` events; a browser that reads slower than that is sent `event: reset`
and the stream ends (the page reconnects and starts from a new snapshot), so a slow reader
never grows memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse

from endpoint_core.errors import NotAuthenticated, Unavailable
from endpoint_core.lifecycle import LifecycleEvent
from endpoint_core.principals import Principal
from endpoint_core.service import EndpointService
from http_bridge.requests import principal_of, service_of

STATIC = Path(__file__).resolve().parent / "static"


@dataclass(frozen=True, slots=True)
class DashboardPolicy:
    max_streams: int = 16
    stream_queue_events: int = 1000
    snapshot_interval_seconds: float = 5.0


class Stream:
    """One browser's queue of lifecycle events, bounded."""

    __slots__ = ("_wake", "closing", "events", "max_events", "organization_id", "overflowed")

    def __init__(self, organization_id: str | None, max_events: int) -> None:
        self.organization_id = organization_id  # None: every organisation
        self.max_events = max_events
        self.events: deque[LifecycleEvent] = deque()
        self.overflowed = False
        self.closing = False  # the service is shutting down
        self._wake = asyncio.Event()

    def offer(self, event: LifecycleEvent) -> None:
        if self.organization_id is not None and event.organization_id != self.organization_id:
            return
        if len(self.events) >= self.max_events:
            self.overflowed = True  # stop queueing; the stream resets
            self.events.clear()
        else:
            self.events.append(event)
        self._wake.set()

    def close(self) -> None:
        self.closing = True
        self._wake.set()

    async def wait(self, seconds: float) -> None:
        """Until an event arrives or `seconds` pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()


class DashboardStreams:
    """The open streams; a table observer that only appends to their bounded queues."""

    def __init__(self, policy: DashboardPolicy) -> None:
        self.policy = policy
        self.streams: set[Stream] = set()
        self.shutting_down = False

    def __call__(self, event: LifecycleEvent) -> None:
        for stream in self.streams:
            stream.offer(event)

    def open(self, principal: Principal) -> Stream:
        if not principal.is_service:
            raise NotAuthenticated("the dashboard needs a SERVICE token", "Authorization")
        if self.shutting_down:
            raise Unavailable("the service is shutting down")
        if len(self.streams) >= self.policy.max_streams:
            raise Unavailable(f"{self.policy.max_streams} dashboard streams are open, the most allowed; retry later")
        stream = Stream(principal.organization_id, self.policy.stream_queue_events)
        self.streams.add(stream)
        return stream

    def close(self, stream: Stream) -> None:
        self.streams.discard(stream)

    def shutdown(self) -> None:
        """End every stream now and refuse new ones (SIGTERM: the HTTP drain waits for open responses)."""
        self.shutting_down = True
        for stream in self.streams:
            stream.close()


async def snapshot(service: EndpointService, organization_id: str | None) -> dict[str, Any]:
    return {"endpoints": await service.dashboard_rows(organization_id)}


def sse(kind: str, data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


async def dashboard_page(request: Request) -> Response:
    """The page itself is public: it holds no data, and asks for a token before it reads any."""
    # Scripts only from this origin (no inline script can run); the page's own inline styles are allowed.
    policy = "default-src 'self'; style-src 'self' 'unsafe-inline'"
    return FileResponse(STATIC / "dashboard.html", media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": policy})


async def dashboard_script(request: Request) -> Response:
    return FileResponse(STATIC / "dashboard.js", media_type="text/javascript; charset=utf-8",
                        headers={"Cache-Control": "no-cache"})


async def dashboard_events(request: Request) -> Response:
    principal = principal_of(request)
    streams: DashboardStreams = request.app.state.dashboard
    service = service_of(request)
    stream = streams.open(principal)

    async def body() -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        interval = streams.policy.snapshot_interval_seconds
        try:
            yield sse("snapshot", await snapshot(service, stream.organization_id))
            next_snapshot = loop.time() + interval
            while True:
                await stream.wait(max(0.0, next_snapshot - loop.time()))
                if stream.closing:
                    return
                if stream.overflowed:
                    yield sse("reset", {"reason": "the stream fell behind; reconnect"})
                    return
                while stream.events:
                    yield sse("lifecycle", stream.events.popleft().to_json())
                if loop.time() >= next_snapshot:
                    yield sse("snapshot", await snapshot(service, stream.organization_id))
                    next_snapshot = loop.time() + interval
        finally:
            streams.close(stream)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
