"""Everything observability adds to the app, in one object: built by http_bridge.app.create_app."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.routing import Route

from endpoint_core.service import EndpointService
from http_bridge.openapi import METRICS_PATH
from observability.exposition import MetricsListener, metrics_route
from observability.lifecycle_counts import LifecycleCounts
from observability.loop import LoopLagSampler
from observability.metrics import Broker, Sources, StoreLike, registry_for
from observability.requests import HttpStats


class Observability:
    """Metrics sources, the registry, and where /metrics is served.

    `metrics_port` 0: GET /metrics is a route of the HTTP app; otherwise it is served
    only by a listener of its own on `host`:`metrics_port`.
    """

    def __init__(self, service: EndpointService, mqtt: Broker, store: StoreLike, *,
                 http_routes: Iterable[str], http_prefix_routes: Iterable[tuple[str, str]] = (),
                 host: str = "127.0.0.1", metrics_port: int = 0) -> None:
        routes = list(http_routes)
        if not metrics_port:
            routes.append(METRICS_PATH)
        self.http = HttpStats(routes, http_prefix_routes)
        self.lifecycle = LifecycleCounts()
        service.table.observers.append(self.lifecycle)
        self.loop = LoopLagSampler()
        self.registry = registry_for(Sources(service, mqtt, store, self.http, self.lifecycle, self.loop))
        self._listener = MetricsListener(self.registry, host, metrics_port) if metrics_port else None

    def routes(self) -> list[Route]:
        """GET /metrics, when it is served on the HTTP port."""
        if self._listener is not None:
            return []
        endpoint: Any = metrics_route(self.registry)
        return [Route(METRICS_PATH, endpoint, methods=["GET"])]

    async def start(self) -> None:
        self.loop.start()
        if self._listener is not None:
            await self._listener.start()

    async def stop(self) -> None:
        self.loop.stop()
        if self._listener is not None:
            await self._listener.stop()
