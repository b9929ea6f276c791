"""Every HTTP request: a request id for its log lines, and its count and duration for metrics.

The outermost ASGI middleware. The request id is the client's X-Request-Id when it is a
short token of safe characters, else a new one; it is echoed in the response and kept in a
context variable, so every log line the request causes carries it (observability.logs).

Two classes, picked when the app is built (http_bridge.app): RequestObserver with metrics on,
RequestIds with metrics off. Neither asks per request whether metrics are on. ObservedCommands
does the same for the command routes served ahead of Starlette.
"""

from __future__ import annotations

import contextvars
import itertools
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from endpoint_core.counting import SECONDS_BUCKETS, BucketCounts
from observability.context import request_id

REQUEST_ID_HEADER = b"x-request-id"
MAX_REQUEST_ID_LENGTH = 128
_SAFE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,%d}" % MAX_REQUEST_ID_LENGTH)

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
OTHER_ROUTE = "other"


# New ids: a random per-process prefix and a counter, unique across restarts and cheaper than a
# uuid4 per request (sendEvent is a hot path).
_ID_PREFIX = secrets.token_hex(8)
_id_counter = itertools.count(1)


def request_id_of(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-Id if it is safe to log and echo, else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _SAFE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return f"{_ID_PREFIX}-{next(_id_counter):x}"


def adopt_request_id(scope: Scope) -> tuple[contextvars.Token[str | None], tuple[bytes, bytes]]:
    """The request's id, made current for the log lines it causes, and the header that echoes it."""
    rid = request_id_of(scope["headers"])
    return request_id.set(rid), (REQUEST_ID_HEADER, rid.encode("ascii"))


class RouteStats:
    """One route's requests by status class, and their durations: plain numbers."""

    __slots__ = ("by_status", "seconds")

    def __init__(self) -> None:
        self.by_status = [0] * len(STATUS_CLASSES)
        self.seconds = BucketCounts(SECONDS_BUCKETS)


class HttpStats:
    """Requests by route template (a closed set: the app's routes, and "other")."""

    def __init__(self, exact_routes: Iterable[str], prefix_routes: Iterable[tuple[str, str]] = ()) -> None:
        self.routes = {route: RouteStats() for route in (*exact_routes, *(t for _, t in prefix_routes),
                                                            OTHER_ROUTE)}
        self._exact = {route: self.routes[route] for route in exact_routes}
        # (path prefix, template): a path under the prefix with one more segment, e.g. /endpoints/{id}.
        self._prefixed = [(prefix, self.routes[template]) for prefix, template in prefix_routes]
        self._other = self.routes[OTHER_ROUTE]

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = self.route_of(path)
        route.seconds.observe(seconds)
        route.by_status[min(max(status // 100, 1), 5) - 1] += 1

    def route_of(self, path: str) -> RouteStats:
        found = self._exact.get(path)
        if found is not None:
            return found
        for prefix, stats in self._prefixed:
            if path.startswith(prefix) and "/" not in path[len(prefix):]:
                return stats
        return self._other


class RequestIds:
    """Middleware with metrics off: request id in, request id out, and nothing counted or timed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token, header = adopt_request_id(scope)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id.reset(token)


class RequestObserver:
    """Middleware with metrics on: request id in, request id out, and the request counted and timed."""

    def __init__(self, app: ASGIApp, stats: HttpStats) -> None:
        self.app = app
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token, header = adopt_request_id(scope)
        status = 500  # if the app fails before it answers
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.stats.observe(scope["path"], status, time.perf_counter() - started)
            request_id.reset(token)


# A command as ObservedCommands calls it: it adds the request id header to its answer itself and
# returns the status it answered, or None if it answered nothing (the client went away).
CommandAnswer = Callable[[Scope, Receive, Send, tuple[bytes, bytes]], Awaitable[int | None]]


class ObservedCommands:
    """RequestIds or RequestObserver (`stats` None or not) for the POST commands that
    http_bridge.app.BridgeApp serves ahead of Starlette: the same request id, log context and
    metrics, without wrapping `send` (two more coroutine frames per response on the hot path)."""

    def __init__(self, answer: CommandAnswer, stats: HttpStats | None) -> None:
        self.answer = answer
        self.stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        token, header = adopt_request_id(scope)
        stats = self.stats
        status: int | None = None
        started = time.perf_counter()
        try:
            status = await self.answer(scope, receive, send, header)
        finally:
            if stats is not None:
                stats.observe(scope["path"], 500 if status is None else status, time.perf_counter() - started)
            request_id.reset(token)
