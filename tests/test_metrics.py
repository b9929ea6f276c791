"""GET /metrics: every family, exact deltas from real traffic, the separate listener, the README table, and
metrics off (metrics_enabled false: no /metrics, request ids kept)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Iterable

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

import run_broker
from broker_plugin.connection import MqttCounters
from config import Settings
from endpoint_core.counting import BucketCounts
from endpoint_core.principals import JwtVerifier
from endpoint_core.service import EndpointService
from endpoint_core.table import EndpointTable, TablePolicy
from http_bridge.openapi import OPENAPI_PATH
from observability.context import request_id
from observability.lifecycle_counts import LifecycleCounts
from observability.loop import LoopLagSampler
from observability.metrics import BrokerCollector, Sources, registry_for
from observability.requests import HttpStats, RequestIds
from store import MemoryStore
from tests.support import ROOT, SECRET, RawMqtt, ServiceProcess, event, listening_ports, token, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by name and labels; parsing is itself the check that the text is valid."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(service: ServiceProcess) -> Samples:
    response = httpx.get(service.base_url + "/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in after, f"no sample {name}{labels}"
    return after[key] - before.get(key, 0.0)


# ------------------------------------------------------------------ the collector, in process


class FakeMqtt:
    def __init__(self) -> None:
        self.counters = MqttCounters()

    def connections_by_transport(self) -> dict[str, int]:
        return {"tcp": 2, "tls": 0, "websocket": 1}


def collector_sources() -> Sources:
    table = EndpointTable()
    service = EndpointService(table, JwtVerifier(secret=SECRET))
    lifecycle = LifecycleCounts()
    table.observers.append(lifecycle)
    return Sources(service, FakeMqtt(), MemoryStore(), HttpStats(["/healthz"]), lifecycle, LoopLagSampler())


def our_families(sources: Sources) -> dict[str, tuple[str, str]]:
    """Family name as exposed (counters with _total) -> (type, its labels as the README writes them)."""
    names = {}
    for family in BrokerCollector(sources).collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        labels = sorted({k for sample in family.samples for k in sample.labels if k not in ("le", "quantile")})
        names[name] = (family.type, ", ".join(f"`{label}`" for label in labels))
    return names


def test_every_family_is_prefixed_and_labels_hold_no_ids() -> None:
    sources = collector_sources()
    endpoint, _ = sources.service.table.register("user-secret-id", "org-secret-id", "endpoint-secret-id", 60, False)
    sources.service.table.keepalive(endpoint)
    text = generate_latest(registry_for(sources, process_metrics=lambda registry: None)).decode()
    samples = parse(text)
    assert all(name.startswith("endpoint_broker_") for name, _ in samples)
    assert not re.search(r"secret-id", text)
    assert samples[("endpoint_broker_endpoints", frozenset({("state", "HEALTHY")}))] == 1
    assert samples[("endpoint_broker_registrations_total", frozenset({("origin", "rest"), ("result", "created")}))] == 1
    assert samples[("endpoint_broker_keepalives_total", frozenset({("source", "rest")}))] == 1
    assert samples[("endpoint_broker_mqtt_connections", frozenset({("transport", "tcp")}))] == 2


def test_the_default_registry_has_the_process_metrics_too() -> None:
    text = generate_latest(registry_for(collector_sources())).decode()
    names = {name for name, _ in parse(text)}
    assert "process_cpu_seconds_total" in names or "python_info" in names
    assert "endpoint_broker_build_info" in names


def test_bucket_counts_are_cumulative_with_le_inclusive() -> None:
    counts = BucketCounts((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        counts.observe(value)
    assert counts.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert counts.count == 4
    assert counts.sum == 3.65


def test_http_routes_are_a_closed_set() -> None:
    stats = HttpStats(["/a"], [("/items/", "/items/{id}")])
    assert stats.route_of("/a") is stats.routes["/a"]
    assert stats.route_of("/items/x1") is stats.routes["/items/{id}"]
    assert stats.route_of("/items/x1/deeper") is stats.routes["other"]
    assert stats.route_of("/anything-else") is stats.routes["other"]


# ------------------------------------------------------------------ README


def documented_metrics(readme: str) -> dict[str, tuple[str, str]]:
    section = readme.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (endpoint_broker_[a-z_]+) \| (counter|gauge|histogram|summary) \| ([^|]*) \|", section,
                      flags=re.MULTILINE)
    return {name: (kind, labels.strip()) for name, kind, labels in rows}


def test_the_readme_lists_every_metric_with_its_type() -> None:
    assert documented_metrics((ROOT / "README.md").read_text()) == our_families(collector_sources())


def test_the_readme_lists_every_cluster_metric_with_its_type() -> None:
    """A cluster node's own families are in README "Cluster", in the same table form."""
    from cluster.directory import Directory
    from cluster.node import ClusterNode
    from cluster.table import ClusterTable

    node = ClusterNode(Directory("redis://127.0.0.1:1/0", TablePolicy()), ClusterTable(), "n1")  # never connects
    sources = collector_sources()
    sources = Sources(sources.service, sources.mqtt, node, sources.http, sources.lifecycle, sources.loop)
    cluster_families = {name: kind for name, kind in our_families(sources).items()
                        if name.startswith("endpoint_broker_cluster_")}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Cluster", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (endpoint_broker_[a-z_]+) \| (counter|gauge|histogram|summary) \| ([^|]*) \|", section,
                      flags=re.MULTILINE)
    assert {name: (kind, labels.strip()) for name, kind, labels in rows} == cluster_families
    assert len(cluster_families) == 5


# ------------------------------------------------------------------ the real service


def counted(samples: Samples, name: str) -> Counter[frozenset[tuple[str, str]]]:
    return Counter({labels: value for (sample, labels), value in samples.items() if sample == name})


def nonzero_deltas(before: Samples, after: Samples, names: Iterable[str]) -> dict[tuple[str, ...], float]:
    """Every changed sample of the given families, as (name, label=value...) -> delta."""
    changed = {}
    for name in names:
        for labels, value in counted(after, name).items():
            moved = value - before.get((name, labels), 0.0)
            if moved:
                changed[(name, *sorted(f"{k}={v}" for k, v in labels))] = moved
    return changed


def test_real_traffic_moves_every_family_by_exactly_what_it_did(make_service, unique: str) -> None:
    service = make_service()
    user, org = f"u-{unique}", f"org-{unique}"
    bearer = token(user, org)
    before = scrape(service)

    rest_endpoint = service.register(bearer)  # REST: created
    with service.http(bearer) as http:
        assert http.post("/rtc-api/users/endpoints/keepalive", json={"userEndpointId": rest_endpoint}).status_code \
            == 204
    mqtt_endpoint = f"m-{unique}"
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(mqtt_endpoint, user, bearer) == (0, False)  # MQTT: created
        assert client.subscribe(f"users/endpoints/{mqtt_endpoint}") == [1]
        client.ping()
        for qos in (0, 1):
            sent = service.send_event(bearer, {"userId": user, "userEndpointId": mqtt_endpoint, "qos": qos,
                                               "event": event()})
            assert sent.json() == 1
            publish = client.next_publish()
            if qos == 1:
                assert publish.packet_id is not None
                client.puback(publish.packet_id)
        wait_until(lambda: delta(before, scrape(service), "endpoint_broker_events_acknowledged_total") == 1)
        client.disconnect()  # clean: the endpoint MQTT made is removed
    assert service.send_event("not-a-token", {"userId": user, "event": event()}).status_code == 401
    assert service.send_event(bearer, {"userId": user, "event": event(timestamp="never")}).status_code == 400
    with RawMqtt(service.mqtt_port) as refused:
        assert refused.connect(f"x-{unique}", user, token(user, org, ttl=-120))[0] == 4  # expired token
    service.register(bearer, keep_alive=1)

    def settled() -> Samples | None:
        samples = scrape(service)
        expired = delta(before, samples, "endpoint_broker_removals_total", reason="expired") == 1
        return samples if expired and delta(before, samples, "endpoint_broker_endpoints_connected") == 0 else None

    after = wait_until(settled, timeout=15)

    lifecycle = nonzero_deltas(before, after, [
        "endpoint_broker_registrations_total", "endpoint_broker_removals_total",
        "endpoint_broker_state_changes_total", "endpoint_broker_endpoint_connects_total",
        "endpoint_broker_endpoint_disconnects_total", "endpoint_broker_keepalives_total",
        "endpoint_broker_endpoints"])
    assert lifecycle == {
        ("endpoint_broker_registrations_total", "origin=rest", "result=created"): 2,
        ("endpoint_broker_registrations_total", "origin=mqtt", "result=created"): 1,
        ("endpoint_broker_removals_total", "reason=disconnected"): 1,
        ("endpoint_broker_removals_total", "reason=expired"): 1,
        ("endpoint_broker_state_changes_total", "previous=HEALTHY", "state=SICK"): 1,
        ("endpoint_broker_endpoint_connects_total", "transport=tcp"): 1,
        ("endpoint_broker_endpoint_disconnects_total", "reason=clean"): 1,
        ("endpoint_broker_keepalives_total", "source=rest"): 1,
        # SUBSCRIBE, PINGREQ, PUBACK and DISCONNECT: every packet after CONNECT is a keepalive.
        ("endpoint_broker_keepalives_total", "source=mqtt"): 4,
        ("endpoint_broker_endpoints", "state=HEALTHY"): 1,  # the REST endpoint is still there
    }
    events = nonzero_deltas(before, after, [
        "endpoint_broker_send_events_total", "endpoint_broker_event_copies_sent_total",
        "endpoint_broker_events_acknowledged_total", "endpoint_broker_events_redelivered_total",
        "endpoint_broker_events_dropped_total", "endpoint_broker_events_queued",
        "endpoint_broker_events_queued_bytes", "endpoint_broker_events_in_flight",
        "endpoint_broker_event_ack_seconds_count"])
    assert events == {
        ("endpoint_broker_send_events_total", "outcome=delivered", "qos=0"): 1,
        ("endpoint_broker_send_events_total", "outcome=delivered", "qos=1"): 1,
        ("endpoint_broker_send_events_total", "outcome=refused", "qos=unknown"): 1,  # the 400 (the 401 is no sendEvent)
        ("endpoint_broker_event_copies_sent_total", "dup=false"): 2,
        ("endpoint_broker_events_acknowledged_total",): 1,
        ("endpoint_broker_event_ack_seconds_count",): 1,
    }
    mqtt = nonzero_deltas(before, after, [
        "endpoint_broker_mqtt_connects_total", "endpoint_broker_mqtt_disconnects_total",
        "endpoint_broker_mqtt_packets_received_total", "endpoint_broker_mqtt_packets_sent_total",
        "endpoint_broker_mqtt_connections"])
    assert mqtt == {
        ("endpoint_broker_mqtt_connects_total", "code=0"): 1,
        ("endpoint_broker_mqtt_connects_total", "code=4"): 1,
        ("endpoint_broker_mqtt_disconnects_total", "reason=clean"): 1,
        ("endpoint_broker_mqtt_disconnects_total", "reason=connect_refused"): 1,
        ("endpoint_broker_mqtt_packets_received_total", "type=connect"): 2,
        ("endpoint_broker_mqtt_packets_received_total", "type=subscribe"): 1,
        ("endpoint_broker_mqtt_packets_received_total", "type=pingreq"): 1,
        ("endpoint_broker_mqtt_packets_received_total", "type=puback"): 1,
        ("endpoint_broker_mqtt_packets_received_total", "type=disconnect"): 1,
        ("endpoint_broker_mqtt_packets_sent_total", "type=connack"): 2,
        ("endpoint_broker_mqtt_packets_sent_total", "type=suback"): 1,
        ("endpoint_broker_mqtt_packets_sent_total", "type=pingresp"): 1,
        ("endpoint_broker_mqtt_packets_sent_total", "type=publish"): 2,
    }
    assert delta(before, after, "endpoint_broker_mqtt_received_bytes_total") > 0
    assert delta(before, after, "endpoint_broker_mqtt_sent_bytes_total") > 0
    assert nonzero_deltas(before, after, ["endpoint_broker_auth_failures_total"]) == {
        ("endpoint_broker_auth_failures_total", "protocol=http", "reason=malformed"): 1,
        ("endpoint_broker_auth_failures_total", "protocol=mqtt", "reason=expired"): 1,
    }
    http = nonzero_deltas(before, after, ["endpoint_broker_http_requests_total"])
    scrapes = http.pop(("endpoint_broker_http_requests_total", "route=/metrics", "status=2xx"))
    assert scrapes >= 2  # the first one, and the polls
    assert http == {
        ("endpoint_broker_http_requests_total", "route=/rtc-api/users/endpoints", "status=2xx"): 2,
        ("endpoint_broker_http_requests_total", "route=/rtc-api/users/endpoints/keepalive", "status=2xx"): 1,
        ("endpoint_broker_http_requests_total", "route=/rtc-api/users/endpoints/sendEvent", "status=2xx"): 2,
        ("endpoint_broker_http_requests_total", "route=/rtc-api/users/endpoints/sendEvent", "status=4xx"): 2,
    }
    assert delta(before, after, "endpoint_broker_http_request_duration_seconds_count",
                 route="/rtc-api/users/endpoints/sendEvent") == 4
    # The store committed the registrations and the QoS 1 event; batching decides how many commits.
    assert delta(before, after, "endpoint_broker_store_commits_total") >= 1
    assert delta(before, after, "endpoint_broker_store_committed_rows_total") >= 3
    # A PUBACK's removal may still be on its way to the store at that scrape; it commits soon after.
    wait_until(lambda: scrape(service)[("endpoint_broker_store_pending_rows", frozenset())] == 0, timeout=10)
    assert delta(before, after, "endpoint_broker_timer_batch_seconds_count") >= 1
    assert after[("endpoint_broker_event_loop_lag_seconds_count", frozenset())] >= 1
    assert ("endpoint_broker_build_info", frozenset({("version", "0.1.0"), ("python", after_python(after))})) in after
    assert ("process_cpu_seconds_total", frozenset()) in after


def after_python(samples: Samples) -> str:
    return next(dict(labels)["python"] for name, labels in samples if name == "endpoint_broker_build_info")


def test_metrics_port_serves_metrics_alone_and_removes_them_from_the_http_port(make_service) -> None:
    from tests.support import free_port

    port = free_port()
    service = make_service(args=["--metrics-port", str(port)])
    assert port in listening_ports(service.process.pid)
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    assert "endpoint_broker_build_info" in {family.name for family in text_string_to_metric_families(response.text)}
    assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 404
    assert httpx.get(service.base_url + "/metrics", timeout=10).status_code == 404


# ------------------------------------------------------------------ metrics off


def app_with(**settings: object) -> Starlette:
    """The service's own wiring (run_broker.build_app), in process; its lifespan is not run."""
    return run_broker.build_app(Settings(store="memory", **settings))  # type: ignore[arg-type]


def get(app: ASGIApp, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """One request to an ASGI app, in process."""
    async def request() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(request())


def test_metrics_off_leaves_no_metrics_route_and_no_metrics_observer() -> None:
    on, off = app_with(), app_with(metrics_enabled=False)
    assert get(on, "/metrics").status_code == 200
    assert get(off, "/metrics").status_code == 404
    # Nothing is counted per lifecycle transition, and nothing is left to start a loop-lag sampler.
    assert any(isinstance(o, LifecycleCounts) for o in on.state.service.table.observers)
    assert not any(isinstance(o, LifecycleCounts) for o in off.state.service.table.observers)
    assert off.state.observability is None


def test_metrics_off_still_gives_every_request_its_id() -> None:
    app = app_with(metrics_enabled=False)
    assert get(app, OPENAPI_PATH, headers={"X-Request-Id": "client-id-1"}).headers["x-request-id"] == "client-id-1"
    first, second = (get(app, "/no-such-route").headers["x-request-id"] for _ in range(2))
    assert first and second and first != second


def test_request_ids_without_metrics_reach_the_log_context() -> None:
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(request_id.get())  # what every log line of the request reads (observability.logs)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    response = get(RequestIds(app), "/", headers={"X-Request-Id": "abc-123"})
    assert response.status_code == 204 and response.headers["x-request-id"] == "abc-123"
    assert seen == ["abc-123"]
    assert request_id.get() is None  # reset after the request


def test_no_metrics_flag_turns_metrics_off_in_the_real_service(make_service) -> None:
    service = make_service(args=["--no-metrics"])
    assert httpx.get(service.base_url + "/metrics", timeout=10).status_code == 404
    response = httpx.get(service.base_url + "/healthz", headers={"X-Request-Id": "probe-7"}, timeout=10)
    assert response.status_code == 200 and response.headers["x-request-id"] == "probe-7"


def post(app: ASGIApp, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def request() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post(path, headers=headers, json={})

    return asyncio.run(request())


@pytest.mark.parametrize("metrics_enabled", [True, False])
def test_commands_served_ahead_of_starlette_keep_their_request_id_and_are_counted(metrics_enabled: bool) -> None:
    """BridgeApp serves the POST commands outside Starlette's stack (ObservedCommands)."""
    app = app_with(metrics_enabled=metrics_enabled)
    assert app.commands is not None  # no CORS: the fast path is the one under test
    path = "/rtc-api/users/endpoints/keepalive"
    response = post(app, path, headers={"X-Request-Id": "cmd-1"})
    assert response.status_code == 401 and response.headers["x-request-id"] == "cmd-1"
    assert response.headers.get_list("x-request-id") == ["cmd-1"]  # added once, not by two layers
    fresh = post(app, path).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", fresh)
    if metrics_enabled:
        counted = app.state.observability.http.routes[path].by_status
        assert counted == [0, 0, 0, 2, 0]  # both 401s, as 4xx
