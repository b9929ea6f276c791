"""Cluster mode (README "Cluster"): one Redis and three nodes, as real processes on loopback.

Each rule of the contract on every node gets one flow here: ids and caps, views,
sendEvent from any node, take-over, coordinated expiry with sparse lease writes. The
failure modes (a killed node, Redis paused, restarted or emptied, a paused node that
comes back) each get a cluster of their own in test_cluster_failures.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.cluster_support import Cluster, lifecycle_watches
from tests.support import PahoClient, RawMqtt, event, service_token, token, wait_until

MAX_ENDPOINTS_PER_USER = 3
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with Cluster(3, env={"ENDPOINT_BROKER_MAX_ENDPOINTS_PER_USER": str(MAX_ENDPOINTS_PER_USER),
                         "ENDPOINT_BROKER_CLIENT_PUBLISH_ALLOW": "users/endpoints/+"}) as started:
        yield started


def register(node: object, bearer: str, endpoint_id: str | None = None, keep_alive: int = 60) -> httpx.Response:
    body: dict[str, object] = {"keepAliveSeconds": keep_alive}
    if endpoint_id is not None:
        body["userEndpointId"] = endpoint_id
    return node.http(bearer).post("/rtc-api/users/endpoints", json=body)  # type: ignore[attr-defined, no-any-return]


def test_an_id_belongs_to_one_owner_and_the_cap_counts_across_nodes(cluster: Cluster, unique: str) -> None:
    a, b, c = cluster.nodes
    org = f"org-{unique}"
    alice, bob = token("alice", org), token("bob", org)
    assert register(a, alice, f"taken-{unique}").status_code == 200
    # Another user, on every other node and over MQTT: 409 and CONNACK 5.
    assert register(b, bob, f"taken-{unique}").status_code == 409
    with RawMqtt(c.mqtt_port) as client:
        assert client.connect(f"taken-{unique}", "bob", bob) == (5, False)
    # The cap counts alice's endpoints wherever they were made.
    assert register(b, alice, f"second-{unique}").status_code == 200
    with RawMqtt(c.mqtt_port) as client:
        assert client.connect(f"third-{unique}", "alice", alice) == (0, False)
    assert register(a, alice, f"fourth-{unique}").status_code == 409
    with RawMqtt(b.mqtt_port) as client:
        assert client.connect(f"fifth-{unique}", "alice", alice) == (5, False)


def test_racing_registrations_on_every_node_are_decided_once(cluster: Cluster, unique: str) -> None:
    """Check and act are one script: concurrent claims never both win."""
    org = f"org-{unique}"
    nodes = cluster.nodes

    def claim(i: int) -> int:
        return register(nodes[i % 3], token(f"user{i}", org), f"contested-{unique}").status_code

    def grow(i: int) -> int:
        return register(nodes[i % 3], token("carol", org), f"carol-{i}-{unique}").status_code

    with ThreadPoolExecutor(12) as pool:
        claims = list(pool.map(claim, range(12)))
        growth = list(pool.map(grow, range(12)))
    assert sorted(claims) == [200] + [409] * 11
    assert sorted(growth) == [200] * MAX_ENDPOINTS_PER_USER + [409] * (12 - MAX_ENDPOINTS_PER_USER)


def test_every_node_answers_the_same_view(cluster: Cluster, unique: str) -> None:
    a, b, c = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    endpoint_id = f"view-{unique}"

    def views() -> list[dict[str, object]]:
        found = [node.view(alice, endpoint_id).json() for node in cluster.nodes]
        for view in found:
            view.pop("lastKeepaliveAgoSeconds")
        return found

    assert register(a, alice, endpoint_id).status_code == 200
    first = views()
    assert first[0] == first[1] == first[2] and first[0]["connected"] is False
    assert b.http(alice).post("/rtc-api/users/endpoints/keepalive", json={"userEndpointId": endpoint_id}
                              ).status_code == 204
    client = PahoClient(endpoint_id, username="alice", password=alice, port=c.mqtt_port)
    try:
        assert client.connect() == 0
        connected = views()  # answered CONNACK 0: every node says so at once
        assert connected[0] == connected[1] == connected[2]
        assert connected[0]["connected"] is True and connected[0]["state"] == "HEALTHY"
        listed = [node.http(alice).get("/rtc-api/users/endpoints").json() for node in cluster.nodes]
        assert [v["id"] for v in listed[0]] == [endpoint_id]
        assert all(v["connected"] for views_of in listed for v in views_of)
        with a.http(service_token("backend", org)) as http, http.stream("GET", "/dashboard/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == "event: snapshot"
            rows = json.loads(next(lines).removeprefix("data: "))["endpoints"]
        assert [(r["id"], r["connected"], r["transport"]) for r in rows] == [(endpoint_id, True, "tcp")]
    finally:
        client.close()
    assert a.http(alice).post("/rtc-api/users/endpoints/unregister", json={"userEndpointId": endpoint_id}
                              ).status_code == 204
    assert [node.view(alice, endpoint_id).status_code for node in cluster.nodes] == [404, 404, 404]


def test_send_event_from_any_node_reaches_every_endpoint_wherever_it_is_connected(
    cluster: Cluster, unique: str,
) -> None:
    org = f"org-{unique}"
    alice = token("alice", org)
    clients = []
    try:
        for index, node in enumerate(cluster.nodes):  # one endpoint of alice on each node
            client = PahoClient(f"phone-{index}-{unique}", username="alice", password=alice, port=node.mqtt_port)
            clients.append(client)
            assert client.connect() == 0
            assert client.subscribe(f"users/endpoints/phone-{index}-{unique}") == [1]
        backend = service_token("backend", org)
        for qos in (1, 0):
            for node in cluster.nodes:
                answer = node.send_event(backend, {"organizationId": org, "userId": "alice", "qos": qos,
                                                   "event": event(sequence=f"{node.http_port}-{qos}")})
                assert answer.status_code == 200 and answer.json() == 3, answer.text
                for client in clients:
                    message = client.next_message()
                    assert message.qos == qos
                    assert message.payload.endswith(f'"sequence":"{node.http_port}-{qos}"}}'.encode())
        # Acknowledged, so gone from every queue in Redis.
        redis = cluster.redis.client()
        wait_until(lambda: all(redis.xlen(f"eb:q:phone-{i}-{unique}") == 0 for i in range(3)))
        one = cluster.nodes[0].send_event(backend, {"organizationId": org, "userId": "alice",
                                                    "userEndpointId": f"phone-2-{unique}", "qos": 1, "event": event()})
        assert one.json() == 1
        assert clients[2].next_message().qos == 1
        assert cluster.nodes[1].http().get("/metrics").status_code == 200
    finally:
        for client in clients:
            client.close()


def test_a_reconnect_to_another_node_takes_over_with_its_unacknowledged_events(cluster: Cluster, unique: str) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    endpoint_id = f"mover-{unique}"
    first = RawMqtt(a.mqtt_port)
    try:
        assert first.connect(endpoint_id, "alice", alice, clean_session=False) == (0, False)
        assert first.subscribe(f"users/endpoints/{endpoint_id}") == [1]
        epoch = int(cluster.record(endpoint_id)["e"])
        backend = service_token("backend", org)
        for n in range(3):
            answer = b.send_event(backend, {"organizationId": org, "userId": "alice", "qos": 1, "event": event(n=n)})
            assert answer.json() == 1
        sent = [first.next_publish() for _ in range(3)]  # received, never acknowledged
        assert [p.dup for p in sent] == [False] * 3
        with RawMqtt(b.mqtt_port) as second:
            assert second.connect(endpoint_id, "alice", alice, clean_session=False) == (0, True)
            first.wait_closed()  # the old node closed the old connection
            again = [second.next_publish(timeout=20) for _ in range(3)]
            assert [p.json()["n"] for p in again] == [0, 1, 2] and all(p.dup for p in again)
            record = cluster.record(endpoint_id)
            assert record["n"] == "node-1" and int(record["e"]) == epoch + 1
            for publish in again:
                assert publish.packet_id is not None
                second.puback(publish.packet_id)
            wait_until(lambda: cluster.redis.client().xlen(f"eb:q:{endpoint_id}") == 0)
    finally:
        first.close()


def test_concurrent_events_from_every_node_all_arrive_in_the_end(cluster: Cluster, unique: str) -> None:
    """Answers to concurrent sendEvents come back in any order; every event taken is delivered."""
    org = f"org-{unique}"
    alice, backend = token("alice", org), service_token("backend", org)
    endpoint_id = f"busy-{unique}"
    client = PahoClient(endpoint_id, username="alice", password=alice, port=cluster.nodes[0].mqtt_port)
    https = [node.http(backend) for node in cluster.nodes]
    try:
        assert client.connect() == 0
        assert client.subscribe(f"users/endpoints/{endpoint_id}") == [1]

        def send(n: int) -> int:
            return https[n % 3].post("/rtc-api/users/endpoints/sendEvent", json={
                "organizationId": org, "userId": "alice", "qos": 1, "event": event(n=n)}).status_code

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(send, range(150))) == {200}
        received: set[int] = set()
        while len(received) < 150:
            received.add(json.loads(client.next_message(timeout=10).payload)["n"])
        wait_until(lambda: cluster.redis.client().xlen(f"eb:q:{endpoint_id}") == 0)
    finally:
        for http in https:
            http.close()
        client.close()


def test_racing_connects_on_two_nodes_leave_one_connection(cluster: Cluster, unique: str) -> None:
    """The newest CONNECT wins even when the older one's answer from Redis arrives last."""
    a, b, _ = cluster.nodes
    for round_ in range(8):
        endpoint_id = f"race-{round_}-{unique}"
        user = f"user{round_}"  # each its own: the module's cluster caps endpoints per user at 3
        bearer = token(user, f"org-{unique}")
        clients = [RawMqtt(a.mqtt_port), RawMqtt(b.mqtt_port)]
        def connect(client: RawMqtt, i: str = endpoint_id, u: str = user, t: str = bearer) -> int | None:
            try:
                return client.connect(i, u, t, keep_alive=0)[0]
            except EOFError:
                return None  # taken over between its grant and its CONNACK: closed, as any loser

        try:
            with ThreadPoolExecutor(2) as pool:
                codes = list(pool.map(connect, clients))
            assert 0 in codes and set(codes) <= {0, 3, None}, codes
            wait_until(lambda i=endpoint_id: cluster.record(i).get("n") in ("node-0", "node-1"))
            holder = 0 if cluster.record(endpoint_id)["n"] == "node-0" else 1
            assert codes[holder] == 0
            clients[1 - holder].wait_closed(10)  # the other one is refused or closed
            clients[holder].ping()
            assert clients[holder].read_packet()[0] == 13  # PINGRESP: the winner is still connected
        finally:
            for client in clients:
                client.close()


def test_an_allowed_client_publish_reaches_an_endpoint_on_another_node(cluster: Cluster, unique: str) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice, bob = token("alice", org), token("bob", org)
    receiver = PahoClient(f"bob-{unique}", username="bob", password=bob, port=b.mqtt_port)
    try:
        assert receiver.connect() == 0
        assert receiver.subscribe(f"users/endpoints/bob-{unique}") == [1]
        with RawMqtt(a.mqtt_port) as sender:
            assert sender.connect(f"alice-{unique}", "alice", alice) == (0, False)
            sender.publish(f"users/endpoints/bob-{unique}", b"ring")
            message = receiver.next_message()
        assert (message.topic, message.payload, message.qos) == (f"users/endpoints/bob-{unique}", b"ring", 0)
    finally:
        receiver.close()


def aof_mentions(cluster: Cluster, key: str) -> int:
    """How many times the AOF (every write, fsynced) names `key`: one or more per write."""
    return sum(path.read_bytes().count(key.encode()) for path in Path(cluster.redis.data_dir).rglob("*.aof"))


def test_keepalives_count_on_any_node_and_are_written_sparingly(cluster: Cluster, unique: str) -> None:
    a, b, c = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    rest_id, mqtt_id = f"rest-{unique}", f"mqtt-{unique}"
    assert register(a, alice, rest_id, keep_alive=30).status_code == 200
    assert register(a, alice, mqtt_id, keep_alive=30).status_code == 200
    client = RawMqtt(c.mqtt_port)
    try:
        assert client.connect(mqtt_id, "alice", alice, keep_alive=30) == (0, False)
        before = {key: aof_mentions(cluster, f"eb:ep:{key}") for key in (rest_id, mqtt_id)}
        stored = float(cluster.record(rest_id)["l"])
        for _ in range(20):  # 20 keepalives each, over REST on two nodes and as MQTT packets
            assert b.http(alice).post("/rtc-api/users/endpoints/keepalive", json={"userEndpointId": rest_id}
                                      ).status_code == 204
            client.ping()
            assert client.read_packet()[0] == 13  # PINGRESP
        # A third of the period (10 s) has not passed: nothing was written for either.
        assert aof_mentions(cluster, f"eb:ep:{rest_id}") == before[rest_id]
        assert aof_mentions(cluster, f"eb:ep:{mqtt_id}") == before[mqtt_id]
        assert float(cluster.record(rest_id)["l"]) == stored
    finally:
        client.close()


def test_an_endpoint_turns_sick_and_expires_once_in_the_whole_cluster(cluster: Cluster, unique: str) -> None:
    a, b, _ = cluster.nodes
    org = f"org-{unique}"
    alice = token("alice", org)
    kept, dropped = f"kept-{unique}", f"dropped-{unique}"
    with lifecycle_watches(cluster, org, unique) as watches:
        assert register(a, alice, kept, keep_alive=2).status_code == 200
        assert register(b, alice, dropped, keep_alive=2).status_code == 200
        stop = threading.Event()

        def keep_alive() -> None:  # every 0.5 s, from a different node each time
            n = 0
            while not stop.wait(0.5):
                node = cluster.nodes[n % 3]
                node.http(alice).post("/rtc-api/users/endpoints/keepalive", json={"userEndpointId": kept})
                n += 1

        worker = threading.Thread(target=keep_alive)
        worker.start()
        try:
            # Unkept: SICK after 2 s, gone 1 s later (grace: half the period, at least 1 s).
            wait_until(lambda: a.view(alice, dropped).status_code == 404, timeout=30)
            assert a.view(alice, kept).json()["state"] == "HEALTHY"
        finally:
            stop.set()
            worker.join()
        wait_until(lambda: b.view(alice, kept).status_code == 404, timeout=30)
        unregistered = "UserEndpointUnregisteredEvent"
        for node in range(3):  # every node's subscribers see every event, each made once
            wait_until(lambda n=node: all(unregistered in watches.kinds(i, n) for i in (dropped, kept)))
            for endpoint_id in (dropped, kept):
                kinds = watches.kinds(endpoint_id, node)
                assert kinds.count("UserEndpointRegisteredEvent") == 1
                assert kinds.count("UserEndpointStateChangedEvent") == 1  # to SICK, once
                assert kinds.count(unregistered) == 1  # expired, once
        ids = [sorted(e["id"] for e in watches.events(node) if e["userEndpointId"] in (dropped, kept))
               for node in range(3)]
        assert ids[0] == ids[1] == ids[2]
