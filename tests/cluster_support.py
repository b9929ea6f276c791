"""Test support for cluster mode: one real Redis and N real nodes on loopback.

Every node is `run_broker.py` with `--redis-url` and its own `--node-id`, started as a
ServiceProcess on free ports; the Redis is tests.redis_support.RedisServer (AOF on,
fsynced on every write). A node is taken for dead after `NODE_TTL_SECONDS` here, so
that tests of node death wait seconds, not the default five.
"""

from __future__ import annotations

import contextlib
import json
import queue
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from prometheus_client.parser import text_string_to_metric_families

from tests.redis_support import RedisServer
from tests.support import ServiceProcess, service_token

NODE_TTL_SECONDS = 2


@dataclass
class Cluster:
    size: int = 3
    env: dict[str, str] = field(default_factory=dict)
    redis: RedisServer = field(default_factory=RedisServer)
    nodes: list[ServiceProcess] = field(default_factory=list)

    def start(self) -> Cluster:
        self.redis.start()
        for index in range(self.size):
            self.nodes.append(ServiceProcess(env={
                "ENDPOINT_BROKER_REDIS_URL": self.redis.url,
                "ENDPOINT_BROKER_NODE_ID": f"node-{index}",
                "ENDPOINT_BROKER_CLUSTER_NODE_TTL_SECONDS": str(NODE_TTL_SECONDS),
                **self.env,
            }))
        for node in self.nodes:
            node.start(wait=False)
        for node in self.nodes:
            node.wait_ready()
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.redis.close()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, endpoint_id: str) -> dict[str, str]:
        """The endpoint's hash in Redis (cluster.scripts), as text."""
        return self.redis.client().hgetall(f"eb:ep:{endpoint_id}")  # type: ignore[no-any-return]


def metric(node: ServiceProcess, name: str, **labels: str) -> float:
    """One sample of a node's GET /metrics (0 if absent)."""
    text = node.http().get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


class LifecycleWatch:
    """A SERVICE client subscribed to one organisation's lifecycle events on one node."""

    def __init__(self, node: ServiceProcess, organization_id: str, client_id: str) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        subscribed: queue.Queue[int] = queue.Queue()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  reconnect_on_failure=False)
        self.client.username_pw_set("backend", service_token("backend", organization_id))
        self.client.on_message = lambda c, u, message: self.events.put(json.loads(message.payload))
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(int(codes[0].value))
        self.client.connect("127.0.0.1", node.mqtt_port)
        self.client.loop_start()
        self.client.subscribe(f"$events/organizations/{organization_id}/endpoints", 1)
        assert subscribed.get(timeout=5) == 1

    def drain(self) -> list[dict[str, Any]]:
        found = []
        with contextlib.suppress(queue.Empty):
            while True:
                found.append(self.events.get_nowait())
        return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Watches:
    """One lifecycle subscription on every node. Each should see every event of the organisation,
    wherever it was made: the node that made it delivers it, the others get it over Redis."""

    def __init__(self, cluster: Cluster, organization_id: str, unique: str) -> None:
        self.watches = [LifecycleWatch(node, organization_id, f"watch-{unique}-{i}")
                        for i, node in enumerate(cluster.nodes)]
        self.seen: list[list[dict[str, Any]]] = [[] for _ in self.watches]

    def events(self, node: int = 0) -> list[dict[str, Any]]:
        """Every event the subscription on node `node` received so far."""
        for index, watch in enumerate(self.watches):
            self.seen[index] += watch.drain()
        return self.seen[node]

    def kinds(self, endpoint_id: str, node: int = 0) -> list[str]:
        return [e["type"] for e in self.events(node) if e["userEndpointId"] == endpoint_id]

    def close(self) -> None:
        for watch in self.watches:
            watch.close()


@contextlib.contextmanager
def lifecycle_watches(cluster: Cluster, organization_id: str, unique: str) -> Iterator[Watches]:
    watches = Watches(cluster, organization_id, unique)
    try:
        yield watches
    finally:
        watches.close()
