"""A cluster node's own metric families, beside the service's (README "Cluster" lists them).

Read at scrape time from plain counters kept by cluster.node, like every other family.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

PREFIX = "endpoint_broker_cluster_"
EXPIRY_STEPS = ("sick", "expired", "released")


@dataclass(slots=True)
class ClusterStats:
    redis_up: bool = False
    nodes: int = 0  # in eb:nodes at this node's last heartbeat
    lease_writes: int = 0  # keepalives written to Redis by lease renewals
    # Expiry steps this node's sweeps made: SICK, expired, and a dead node's connection released.
    expiry_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXPIRY_STEPS, 0))
    announce_failures: int = 0  # lifecycle events not announced to the other nodes


def families(stats: ClusterStats) -> Iterator[Metric]:
    yield GaugeMetricFamily(PREFIX + "redis_up", "1 while this node reaches the cluster's Redis, else 0.",
                            value=int(stats.redis_up))
    yield GaugeMetricFamily(PREFIX + "nodes", "Nodes with a recent heartbeat, as of this node's last one.",
                            value=stats.nodes)
    yield CounterMetricFamily(PREFIX + "lease_writes", "Keepalives this node wrote to Redis as leases.",
                              value=stats.lease_writes)
    steps = CounterMetricFamily(PREFIX + "expiry_steps", "Expiry steps this node's sweeps made: sick, expired, "
                                "released (a dead node's connection).", labels=["step"])
    for step, count in stats.expiry_steps.items():
        steps.add_metric([step], count)
    yield steps
    yield CounterMetricFamily(PREFIX + "lifecycle_announce_failures",
                              "Lifecycle events not announced to the other nodes (Redis unreachable).",
                              value=stats.announce_failures)
