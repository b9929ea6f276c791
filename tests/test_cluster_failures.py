"""Cluster failure modes (README "Cluster"), each on a cluster of its own: one Redis, three nodes.

A node killed with its clients' unacknowledged events, Redis frozen (SIGSTOP) and back,
Redis restarted from its AOF and restarted empty, and a node frozen past its TTL that
comes back after its endpoint was taken over.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from tests.cluster_support import Cluster, lifecycle_watches, metric
from tests.support import PahoClient, RawMqtt, event, service_token, token, wait_until

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with Cluster(3) as started:
        yield started


def send(node: object, org: str, qos: int = 1, **fields: object) -> object:
    return node.send_event(service_token("backend", org),  # type: ignore[attr-defined]
                           {"organizationId": org, "userId": "alice", "qos": qos, "event": event(**fields)})


def test_a_killed_nodes_clients_get_their_events_elsewhere_and_its_other_endpoints_expire(
    cluster: Cluster, unique: str,
) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    held, gone = f"held-{unique}", f"gone-{unique}"
    assert a.http(alice).post("/rtc-api/users/endpoints", json={"keepAliveSeconds": 2, "userEndpointId": gone}
                              ).status_code == 200
    with lifecycle_watches(cluster, org, unique) as watches, RawMqtt(a.mqtt_port) as first, \
            RawMqtt(a.mqtt_port) as idle:
        assert first.connect(held, "alice", alice, clean_session=False) == (0, False)
        assert first.subscribe(f"users/endpoints/{held}") == [1]
        assert idle.connect(gone, "alice", alice, keep_alive=2) == (0, False)
        for n in range(2):
            answer = send(b, org, n=n, userEndpointId=None)
            assert answer.status_code == 200  # type: ignore[attr-defined]
        assert [first.next_publish().json()["n"] for _ in range(2)] == [0, 1]  # never acknowledged
        a.stop(signal.SIGKILL)
        with RawMqtt(b.mqtt_port) as second:  # the client reconnects to another node
            assert second.connect(held, "alice", alice, clean_session=False) == (0, True)
            again = [second.next_publish(timeout=20) for _ in range(2)]
            assert [p.json()["n"] for p in again] == [0, 1] and all(p.dup for p in again)
        # Nobody reconnects `gone`: released once node-0 is taken for dead, then expired on schedule.
        wait_until(lambda: b.view(alice, gone).status_code == 404, timeout=30)
        # The two survivors' sweeps, together, released node-0's two connections once each (gone's,
        # and its lifecycle watch's; held's had moved to node-1 already) and expired gone once.
        steps = {step: sum(metric(node, "endpoint_broker_cluster_expiry_steps_total", step=step)
                           for node in cluster.nodes[1:]) for step in ("released", "expired")}
        assert steps == {"released": 2, "expired": 1}
        reasons = wait_until(lambda: [e.get("reason") for e in watches.events(1)
                                      if e["userEndpointId"] == gone and e.get("reason") == "expired"])
        assert reasons == ["expired"]
        assert "dropped" in [e.get("reason") for e in watches.events(1)
                             if e["userEndpointId"] == gone and e["type"] == "UserEndpointDisconnectedEvent"]


def test_while_redis_is_frozen_nodes_stay_up_answer_503_and_recover_without_a_restart(
    cluster: Cluster, unique: str,
) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    here = PahoClient(f"here-{unique}", username="alice", password=alice, port=a.mqtt_port)
    try:
        assert here.connect() == 0
        assert here.subscribe(f"users/endpoints/here-{unique}") == [1]
        cluster.redis.pause()
        wait_until(lambda: a.health()["status"] == "degraded", timeout=30)
        assert a.health()["cluster"] == {"node": "node-0", "redis": "unreachable"}
        assert metric(a, "endpoint_broker_cluster_redis_up") == 0
        assert send(a, org, qos=1).status_code == 503  # type: ignore[attr-defined]
        register = a.http(alice).post("/rtc-api/users/endpoints", json={"keepAliveSeconds": 60})
        assert register.status_code == 503 and register.headers["content-type"] == "application/problem+json"
        assert a.http(alice).post("/rtc-api/users/endpoints/unregister",
                                  json={"userEndpointId": f"here-{unique}"}).status_code == 503
        with RawMqtt(b.mqtt_port) as refused:
            assert refused.connect(f"new-{unique}", "alice", alice) == (3, False)
        # QoS 0 still reaches the connections this node holds.
        answer = send(a, org, qos=0, marker="frozen")
        assert answer.status_code == 200 and answer.json() == 1  # type: ignore[attr-defined]
        assert b'"marker":"frozen"' in here.next_message(timeout=20).payload
        cluster.redis.resume()
        wait_until(lambda: a.health()["status"] == "ok" and b.health()["status"] == "ok", timeout=30)
        assert metric(a, "endpoint_broker_cluster_redis_up") == 1
        assert metric(a, "endpoint_broker_cluster_nodes") == 3
        assert a.http(alice).post("/rtc-api/users/endpoints", json={"keepAliveSeconds": 60}).status_code == 200
        with RawMqtt(b.mqtt_port) as accepted:
            assert accepted.connect(f"new-{unique}", "alice", alice) == (0, False)
        answer = send(b, org, qos=1, marker="back")
        assert answer.status_code == 200  # type: ignore[attr-defined]
        assert b'"marker":"back"' in here.next_message(timeout=20).payload
        # Nobody could heartbeat while Redis was frozen: no node was taken for dead for it.
        assert cluster.record(f"here-{unique}")["n"] == "node-0"
        assert sum(metric(node, "endpoint_broker_cluster_expiry_steps_total", step="released")
                   for node in cluster.nodes) == 0
    finally:
        cluster.redis.resume()
        here.close()


def test_redis_restarted_from_its_aof_keeps_every_endpoint_and_event_route(cluster: Cluster, unique: str) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    kept = f"kept-{unique}"
    assert a.http(alice).post("/rtc-api/users/endpoints", json={"keepAliveSeconds": 60, "userEndpointId": kept}
                              ).status_code == 200
    subscriber = PahoClient(f"sub-{unique}", username="alice", password=alice, port=b.mqtt_port)
    try:
        assert subscriber.connect() == 0
        assert subscriber.subscribe(f"users/endpoints/sub-{unique}") == [1]
        version = a.view(alice, kept).json()["version"]
        cluster.redis.restart()
        wait_until(lambda: send(a, org, marker="after").status_code == 200, timeout=30)  # type: ignore[attr-defined]
        view = a.view(alice, kept)
        assert view.status_code == 200, view.text
        assert view.json()["version"] == version
        assert b.view(alice, f"sub-{unique}").json()["connected"] is True
        # node-1 missed the wake while Redis was down: it reads the queue when it subscribes again.
        assert b'"marker":"after"' in subscriber.next_message(timeout=20).payload
    finally:
        subscriber.close()


def test_redis_restarted_empty_gets_the_held_endpoints_back_as_unknown(cluster: Cluster, unique: str) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    held = f"held-{unique}"
    subscriber = PahoClient(held, username="alice", password=alice, port=b.mqtt_port)
    try:
        assert subscriber.connect() == 0
        assert subscriber.subscribe(f"users/endpoints/{held}") == [1]
        cluster.redis.restart_empty()
        view = wait_until(lambda: (r := a.view(alice, held)).status_code == 200 and r.json(), timeout=30)
        assert view["state"] == "UNKNOWN" and view["connected"] is True
        answer = send(a, org, marker="again")
        assert answer.status_code == 200 and answer.json() == 1  # type: ignore[attr-defined]
        assert b'"marker":"again"' in subscriber.next_message(timeout=20).payload
    finally:
        subscriber.close()


def test_a_frozen_node_that_comes_back_after_a_take_over_changes_nothing(cluster: Cluster, unique: str) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    endpoint_id = f"contested-{unique}"
    assert a.process is not None
    with RawMqtt(a.mqtt_port) as stale, RawMqtt(b.mqtt_port) as fresh:
        assert stale.connect(endpoint_id, "alice", alice, clean_session=False) == (0, False)
        assert stale.subscribe(f"users/endpoints/{endpoint_id}") == [1]
        os.kill(a.process.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: cluster.record(endpoint_id)["n"] == "", timeout=20)
            assert fresh.connect(endpoint_id, "alice", alice, clean_session=False) == (0, True)
            taken = cluster.record(endpoint_id)
        finally:
            os.kill(a.process.pid, signal.SIGCONT)
        # A new subscription the node must store: Redis refuses the stale write, and the node closes
        # the connection rather than grant it (if its heartbeat found out first, the same).
        with pytest.raises(EOFError):
            stale.subscribe(f"user/alice/{endpoint_id}")
        wait_until(lambda: "no longer held by this node" in a.stderr())
        assert cluster.record(endpoint_id)["n"] == "node-1"
        assert cluster.record(endpoint_id)["e"] == taken["e"]
        answer = send(a, org, marker="fresh")
        assert answer.json() == 1  # type: ignore[attr-defined]
        assert fresh.next_publish().json()["marker"] == "fresh"


def test_a_node_restarted_under_the_same_id_lets_go_of_what_its_previous_process_held(unique: str) -> None:
    """Back within its TTL, it is never taken for dead: it must release the old connections itself."""
    with Cluster(3, env={"ENDPOINT_BROKER_CLUSTER_NODE_TTL_SECONDS": "30"}) as cluster:
        a, b, _ = cluster.nodes
        alice = token("alice", f"org-{unique}")
        endpoint_id = f"orphan-{unique}"
        with RawMqtt(a.mqtt_port) as client:  # keep-alive 0: no deadline while Redis says connected
            assert client.connect(endpoint_id, "alice", alice, keep_alive=0) == (0, False)
            a.restart(signal.SIGKILL)
        assert b.view(alice, endpoint_id).json()["connected"] is True
        wait_until(lambda: b.view(alice, endpoint_id).json()["connected"] is False, timeout=30)
        assert cluster.record(endpoint_id)["n"] == ""


def test_a_rest_keepalive_answered_without_a_write_is_written_before_it_could_matter(
    cluster: Cluster, unique: str,
) -> None:
    """Leases: the keepalive is deferred (Redis's copy is fresh), then written within a third of the
    period of Redis's copy, with no further keepalive, so the endpoint cannot turn SICK early."""
    a, b, _ = cluster.nodes
    alice = token("alice", f"org-{unique}")
    endpoint_id = f"lease-{unique}"
    assert a.http(alice).post("/rtc-api/users/endpoints", json={"keepAliveSeconds": 3, "userEndpointId": endpoint_id}
                              ).status_code == 200
    registered = float(cluster.record(endpoint_id)["l"])
    writes = metric(b, "endpoint_broker_cluster_lease_writes_total")
    assert b.http(alice).post("/rtc-api/users/endpoints/keepalive", json={"userEndpointId": endpoint_id}
                              ).status_code == 204
    seconds, micros = cluster.redis.client().time()
    answered = seconds + micros / 1e6
    assert float(cluster.record(endpoint_id)["l"]) == registered  # answered, not written
    written = wait_until(lambda: (at := float(cluster.record(endpoint_id)["l"])) > registered and at, timeout=20)
    assert written <= answered  # the keepalive's own time, not the later time of the write
    assert metric(b, "endpoint_broker_cluster_lease_writes_total") == writes + 1
    assert b.view(alice, endpoint_id).json()["state"] == "HEALTHY"
