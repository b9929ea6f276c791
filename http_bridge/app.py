"""The Starlette app: REST routes, /healthz, MQTT over WebSocket, and the lifespan that runs the broker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from endpoint_core.errors import DomainError
from endpoint_core.expiry import ExpiryDriver
from endpoint_core.journal import Store
from endpoint_core.service import EndpointService
from http_bridge.commands import CommandRoutes, answer_command, is_command
from http_bridge.dashboard import DashboardPolicy, DashboardStreams
from http_bridge.problems import domain_error, http_error, unexpected_error
from http_bridge.routes import routes
from http_bridge.webhook import WebhookSender
from observability.requests import ObservedCommands, RequestIds, RequestObserver
from observability.wiring import Observability


class BridgeApp(Starlette):
    """Starlette, with the POST command routes served ahead of its middleware stack.

    They are the hot paths (sendEvent, keepalive). Starlette's own __call__, its error
    middleware and that middleware's send wrapper cost about 2 microseconds a request, a
    fiftieth of a sendEvent. The commands keep what the stack gave them: the request id and
    metrics (observability.requests.ObservedCommands), and their own answer to an unexpected
    error (http_bridge.commands). `commands` is None when CORS is configured: CORS must wrap them.
    """

    commands: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.commands is not None and is_command(scope):
            scope["app"] = self
            await self.commands(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class MqttHost(Protocol):
    """The broker as the bridge sees it (broker_plugin.runtime.MqttRuntime)."""

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def open_link(self, transport: Any, peer: str, transport_name: str) -> Any:
        """An MqttLink for a WebSocket connection (http_bridge.websocket), or None if refused."""
        ...

    def stats(self) -> dict[str, int]: ...

    counters: Any  # broker_plugin.connection.MqttCounters, for metrics

    def connections_by_transport(self) -> dict[str, int]: ...


def create_app(
    service: EndpointService,
    mqtt: MqttHost,
    store: Store,
    *,
    max_body_bytes: int = 64 * 1024,
    cors_allow_origins: Sequence[str] = (),
    on_starting: Callable[[], None] | None = None,
    on_started: Callable[[], None] | None = None,
    metrics_enabled: bool = True,
    metrics_port: int = 0,
    metrics_host: str = "127.0.0.1",
    dashboard: DashboardPolicy | None = None,
    webhook: WebhookSender | None = None,
) -> BridgeApp:
    streams = DashboardStreams(dashboard or DashboardPolicy())
    service.table.observers.append(streams)
    service.table.peer_observers.append(streams)
    # Route templates are the closed set of the HTTP metrics' `route` label.
    paths = [route.path for route in routes if isinstance(route, Route)]
    # Metrics off: no /metrics, no lifecycle counts, no loop-lag sampler, no per-request counting.
    observability = Observability(
        service, mqtt, store, host=metrics_host, metrics_port=metrics_port,
        http_routes=[path for path in paths if "{" not in path],
        http_prefix_routes=[(path.split("{", 1)[0], path) for path in paths if "{" in path],
    ) if metrics_enabled else None

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # The broker and the store live inside the lifespan, so that uvicorn's SIGTERM/SIGINT
        # handling drains them with the bridge: uvicorn stops accepting and finishes the requests
        # in flight first, then this closes the MQTT connections and commits the journal last
        # (closing connections can journal changes too).
        store.start(asyncio.get_running_loop())
        if on_starting is not None:
            on_starting()
        await mqtt.start()
        expiry = ExpiryDriver(service.table)
        expiry.start()
        if observability is not None:
            await observability.start()
        if webhook is not None:
            webhook.start()
        if on_started is not None:
            on_started()
        try:
            yield
        finally:
            if observability is not None:
                await observability.stop()
            expiry.stop()
            await mqtt.stop()
            if webhook is not None:
                await webhook.stop()
            await store.close()

    # Outermost: every request gets its id (and is counted, with metrics on), whatever answers it.
    middleware: list[Middleware] = [
        Middleware(RequestIds) if observability is None else Middleware(RequestObserver, stats=observability.http)]
    # The same observer class, for the commands that skip the stack (BridgeApp).
    commands = None if cors_allow_origins else ObservedCommands(
        answer_command, None if observability is None else observability.http)
    if cors_allow_origins:
        # Tokens travel in the Authorization header, never in cookies, so no credentials mode.
        middleware.append(Middleware(
            CORSMiddleware,
            allow_origins=list(cors_allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            max_age=600,
        ))
    # Innermost, so that CORS wraps the command routes too; /ws.
    middleware.append(Middleware(CommandRoutes))
    app = BridgeApp(
        routes=[*routes, *(observability.routes() if observability is not None else ())],
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            DomainError: domain_error,
            HTTPException: http_error,
            Exception: unexpected_error,
        },
    )
    app.commands = commands
    app.state.service = service
    app.state.mqtt = mqtt
    app.state.store = store
    app.state.observability = observability  # None with metrics off
    app.state.dashboard = streams
    app.state.max_body_bytes = max_body_bytes
    return app
