"""The Prometheus collector: reads the service's plain counters at scrape time.

Counters live where things happen (TableStats, MqttCounters, ServiceStats, StoreStats,
HttpStats, LifecycleCounts) as plain integers; nothing here runs per packet or per event.
Every label value comes from a closed set: never an endpoint, user or organisation id.
README "Metrics" lists every family; tests/test_metrics.py keeps that table in step.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from broker_plugin import codec
from broker_plugin.connection import MqttCounters
from endpoint_core.counting import BucketCounts
from endpoint_core.endpoint import EndpointState
from endpoint_core.journal import StoreStats
from endpoint_core.service import SEND_OUTCOMES, EndpointService
from observability.lifecycle_counts import LifecycleCounts, label
from observability.loop import LoopLagSampler
from observability.requests import STATUS_CLASSES, HttpStats

PREFIX = "endpoint_broker_"

# Packet types by their number (MQTT 3.1.1, 2.2.1), as label values.
PACKET_TYPES = {
    codec.CONNECT: "connect", codec.CONNACK: "connack", codec.PUBLISH: "publish", codec.PUBACK: "puback",
    codec.PUBREC: "pubrec", codec.PUBREL: "pubrel", codec.PUBCOMP: "pubcomp", codec.SUBSCRIBE: "subscribe",
    codec.SUBACK: "suback", codec.UNSUBSCRIBE: "unsubscribe", codec.UNSUBACK: "unsuback",
    codec.PINGREQ: "pingreq", codec.PINGRESP: "pingresp", codec.DISCONNECT: "disconnect",
}
AUTH_FAILURE_REASONS = ("missing", "malformed", "algorithm", "bad_signature", "expired", "not_yet_valid",
                        "missing_claim", "invalid_claim")
AUTH_PROTOCOLS = ("http", "mqtt")
QOS_LABELS = ("0", "1", "unknown")


class Broker(Protocol):
    """The MQTT side as metrics see it (broker_plugin.runtime.MqttRuntime)."""

    counters: MqttCounters

    def connections_by_transport(self) -> dict[str, int]: ...


class StoreLike(Protocol):
    @property
    def stats(self) -> StoreStats: ...


@dataclass
class Sources:
    """Everything the collector reads."""

    service: EndpointService
    mqtt: Broker
    store: StoreLike
    http: HttpStats
    lifecycle: LifecycleCounts
    loop: LoopLagSampler


def _name(short: str) -> str:
    return PREFIX + short


def _counter(short: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(_name(short), doc, labels=list(labels))


def _gauge(short: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(_name(short), doc, labels=list(labels))


def _histogram(short: str, doc: str, counts: BucketCounts, labels: Sequence[str] = (),
               values: Sequence[str] = (), family: HistogramMetricFamily | None = None) -> HistogramMetricFamily:
    family = family or HistogramMetricFamily(_name(short), doc, labels=list(labels))
    family.add_metric(list(values), counts.cumulative(), counts.sum)
    return family


def version() -> str:
    try:
        return metadata.version("endpoint-broker")
    except metadata.PackageNotFoundError:
        return "unknown"


class BrokerCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        yield from self._build()
        yield from self._endpoints()
        yield from self._http()
        yield from self._events()
        yield from self._mqtt()
        yield from self._auth()
        yield from self._loop()
        yield from self._store()

    def _build(self) -> Iterator[Metric]:
        info = _gauge("build_info", "Always 1: the running version.", ("version", "python"))
        info.add_metric([version(), platform.python_version()], 1)
        yield info

    def _endpoints(self) -> Iterator[Metric]:
        s = self.sources
        table = s.service.table
        by_state = dict.fromkeys((state.value for state in EndpointState), 0)
        connected = 0
        for endpoint in table:
            by_state[endpoint.state.value] += 1
            connected += endpoint.link is not None
        endpoints = _gauge("endpoints", "Registered endpoints by state.", ("state",))
        for state, count in by_state.items():
            endpoints.add_metric([state], count)
        yield endpoints
        yield GaugeMetricFamily(_name("endpoints_connected"), "Endpoints with a live MQTT connection.",
                                value=connected)
        connections = _gauge("mqtt_connections", "Open MQTT connections by transport, those awaiting "
                                                 "their CONNECT included.", ("transport",))
        for transport, count in s.mqtt.connections_by_transport().items():
            connections.add_metric([transport], count)
        yield connections
        lifecycle = s.lifecycle
        yield _labelled(_counter("registrations", "Endpoints registered (created) or re-registered with "
                                                  "changes (updated), by origin.", ("origin", "result")),
                        {(origin.lower(), result): n for (origin, result), n in lifecycle.registrations.items()})
        yield _labelled(_counter("removals", "Endpoints removed, by reason.", ("reason",)), lifecycle.removals)
        yield _labelled(_counter("state_changes", "Endpoint state changes (HEALTHY, SICK), by previous and new "
                                                  "state.", ("previous", "state")), lifecycle.state_changes)
        yield _labelled(_counter("endpoint_connects", "MQTT connections attached to an endpoint, by transport.",
                                 ("transport",)), lifecycle.connects)
        yield _labelled(_counter("endpoint_disconnects", "MQTT connections detached from an endpoint, by reason.",
                                 ("reason",)), lifecycle.disconnects)
        stats = table.stats
        keepalives = _counter("keepalives", "Keepalives, by source: REST calls and MQTT packets.", ("source",))
        keepalives.add_metric(["rest"], stats.keepalives_rest)
        keepalives.add_metric(["mqtt"], stats.keepalives_mqtt)
        yield keepalives

    def _http(self) -> Iterator[Metric]:
        requests = _counter("http_requests", "HTTP requests by route and status class.", ("route", "status"))
        duration = HistogramMetricFamily(_name("http_request_duration_seconds"),
                                         "HTTP request duration by route, until the response is sent.",
                                         labels=["route"])
        for route, stats in self.sources.http.routes.items():
            for status, count in zip(STATUS_CLASSES, stats.by_status, strict=True):
                requests.add_metric([route, status], count)
            _histogram("", "", stats.seconds, values=[route], family=duration)
        yield requests
        yield duration

    def _events(self) -> Iterator[Metric]:
        s = self.sources
        stats = s.service.table.stats
        send_events = _counter("send_events", "sendEvent calls by QoS and outcome (delivered to some endpoint, "
                                              "not delivered, refused with an error).", ("qos", "outcome"))
        for qos, outcomes in zip(QOS_LABELS, s.service.stats.send_events, strict=True):
            for outcome, count in zip(SEND_OUTCOMES, outcomes, strict=True):
                send_events.add_metric([qos, outcome], count)
        yield send_events
        copies = _counter("event_copies_sent", "Event PUBLISHes sent, first sends and DUP resends.", ("dup",))
        copies.add_metric(["false"], stats.copies_sent)
        copies.add_metric(["true"], stats.copies_sent_dup)
        yield copies
        yield CounterMetricFamily(_name("events_acknowledged"), "QoS 1 events acknowledged by every PUBACK.",
                                  value=stats.events_acknowledged)
        yield CounterMetricFamily(_name("events_redelivered"), "QoS 1 events sent again after the ack timeout.",
                                  value=stats.events_redelivered)
        dropped = _counter("events_dropped", "QoS 1 events dropped, by reason.", ("reason",))
        dropped.add_metric(["queue_full"], stats.dropped_queue_full)
        dropped.add_metric(["endpoint_removed"], stats.dropped_endpoint_removed)
        yield dropped
        queued = queued_bytes = in_flight = 0
        for endpoint in s.service.table:
            outbox = endpoint.outbox
            if outbox is not None:
                queued += len(outbox)
                queued_bytes += outbox.queued_bytes
                in_flight += outbox.in_flight
        yield GaugeMetricFamily(_name("events_queued"), "QoS 1 events queued, sent or not, awaiting PUBACK.",
                                value=queued)
        yield GaugeMetricFamily(_name("events_queued_bytes"), "Payload bytes of the queued QoS 1 events.",
                                value=queued_bytes)
        yield GaugeMetricFamily(_name("events_in_flight"), "QoS 1 events sent and awaiting PUBACK.",
                                value=in_flight)
        yield _histogram("event_ack_seconds", "From a QoS 1 event's last send to its last PUBACK.",
                         stats.ack_seconds)

    def _mqtt(self) -> Iterator[Metric]:
        counters = self.sources.mqtt.counters
        connects = _counter("mqtt_connects", "CONNECTs answered, by CONNACK return code.", ("code",))
        for code, count in enumerate(counters.connacks):
            connects.add_metric([str(code)], count)
        yield connects
        yield _labelled(_counter("mqtt_disconnects", "MQTT connections closed, by reason.", ("reason",)),
                        {label(reason.value): n for reason, n in counters.closes.items()})
        received = _counter("mqtt_packets_received", "MQTT packets received, by type.", ("type",))
        sent = _counter("mqtt_packets_sent", "MQTT packets sent, by type.", ("type",))
        for number, name in PACKET_TYPES.items():
            received.add_metric([name], counters.packets_in[number])
            sent.add_metric([name], counters.packets_out[number])
        yield received
        yield sent
        yield CounterMetricFamily(_name("mqtt_received_bytes"), "Bytes received on MQTT connections.",
                                  value=counters.bytes_in)
        yield CounterMetricFamily(_name("mqtt_sent_bytes"), "Bytes sent on MQTT connections.",
                                  value=counters.bytes_out)

    def _auth(self) -> Iterator[Metric]:
        failures = self.sources.service.stats.auth_failures
        family = _counter("auth_failures", "Refused credentials, by reason and protocol.", ("reason", "protocol"))
        for reason in AUTH_FAILURE_REASONS:
            for protocol in AUTH_PROTOCOLS:
                family.add_metric([reason, protocol], failures.get((reason, protocol), 0))
        yield family

    def _loop(self) -> Iterator[Metric]:
        yield _histogram("event_loop_lag_seconds", "How late a timer callback ran, sampled twice a second.",
                         self.sources.loop.lag_seconds)
        yield _histogram("timer_batch_seconds", "Duration of one pass over the due endpoint timers.",
                         self.sources.service.table.stats.timer_batch_seconds)

    def _store(self) -> Iterator[Metric]:
        stats = self.sources.store.stats
        yield CounterMetricFamily(_name("store_commits"), "Store commits.", value=stats.commits)
        yield CounterMetricFamily(_name("store_failed_commits"), "Store commits that failed.",
                                  value=stats.failed_commits)
        yield SummaryMetricFamily(_name("store_commit_seconds"), "Store commit duration.",
                                  count_value=stats.commits, sum_value=stats.commit_seconds_total)
        yield CounterMetricFamily(_name("store_committed_rows"), "Changes committed to the store.",
                                  value=stats.rows_committed)
        yield GaugeMetricFamily(_name("store_last_batch_rows"), "Changes in the last commit.",
                                value=stats.last_batch_rows)
        yield GaugeMetricFamily(_name("store_pending_rows"), "Changes journalled and not yet committed.",
                                value=stats.pending_rows)
        store = self.sources.store
        if isinstance(store, ClusterNodeMetrics):
            yield from store.cluster_metrics()


@runtime_checkable
class ClusterNodeMetrics(Protocol):
    """A cluster node's store (cluster.node) adds families of its own, listed in README "Cluster"."""

    def cluster_metrics(self) -> Iterator[Metric]: ...


def _labelled(family: CounterMetricFamily, counts: dict[str, int] | dict[tuple[str, str], int]) \
        -> CounterMetricFamily:
    for key, count in counts.items():
        family.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return family


def registry_for(sources: Sources, process_metrics: Callable[[CollectorRegistry], None] | None = None) \
        -> CollectorRegistry:
    """A registry of its own (not the library's global one): ours, and the default process metrics."""
    registry = CollectorRegistry()
    registry.register(BrokerCollector(sources))
    (process_metrics or _default_process_metrics)(registry)
    return registry


def _default_process_metrics(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
