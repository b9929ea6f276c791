"""Unit tests of the dashboard stream's rules: SERVICE tokens only, organisation scoping, bounds."""

from __future__ import annotations

import time

import pytest

from endpoint_core.errors import NotAuthenticated, Unavailable
from endpoint_core.lifecycle import LifecycleEvent, LifecycleType
from endpoint_core.principals import JwtVerifier, Principal
from endpoint_core.service import EndpointService
from endpoint_core.table import EndpointTable
from http_bridge.dashboard import DashboardPolicy, DashboardStreams, snapshot
from tests.fakes import FakeClock, FakeLink

EXP = time.time() + 3600


def event(org: str, endpoint_id: str = "e1") -> LifecycleEvent:
    return LifecycleEvent(LifecycleType.REGISTERED, 0.0, endpoint_id, "alice", org, "HEALTHY", 0, "REST", 60)


def test_only_service_tokens_open_a_stream_and_only_so_many() -> None:
    streams = DashboardStreams(DashboardPolicy(max_streams=2))
    with pytest.raises(NotAuthenticated):
        streams.open(Principal("alice", "acme", False, EXP))
    first = streams.open(Principal("backend", "acme", True, EXP))
    streams.open(Principal("backend", None, True, EXP))
    with pytest.raises(Unavailable):
        streams.open(Principal("backend", None, True, EXP))
    streams.close(first)
    streams.open(Principal("backend", None, True, EXP))  # room again


def test_a_stream_sees_its_organisation_and_an_unscoped_one_sees_all() -> None:
    streams = DashboardStreams(DashboardPolicy())
    acme = streams.open(Principal("backend", "acme", True, EXP))
    everyone = streams.open(Principal("backend", None, True, EXP))
    streams(event("acme", "e1"))
    streams(event("other", "e2"))
    assert [e.endpoint_id for e in acme.events] == ["e1"]
    assert [e.endpoint_id for e in everyone.events] == ["e1", "e2"]


def test_a_stream_that_falls_behind_stops_queueing_and_is_reset() -> None:
    streams = DashboardStreams(DashboardPolicy(stream_queue_events=2))
    stream = streams.open(Principal("backend", None, True, EXP))
    for number in range(5):
        streams(event("acme", f"e{number}"))
    assert stream.overflowed and len(stream.events) <= 2


def test_shutdown_closes_every_stream_and_refuses_new_ones() -> None:
    streams = DashboardStreams(DashboardPolicy())
    stream = streams.open(Principal("backend", None, True, EXP))
    streams.shutdown()
    assert stream.closing
    with pytest.raises(Unavailable):
        streams.open(Principal("backend", None, True, EXP))


async def test_the_snapshot_is_scoped_and_adds_the_transport() -> None:
    table = EndpointTable(clock=FakeClock())
    table.register("alice", "acme", "e1", 60, False)
    table.connect("bob", "acme", "e2", 30, FakeLink(transport_name="websocket"), False)
    table.register("carol", "other", "e3", 60, False)
    service = EndpointService(table, JwtVerifier(secret="s" * 32))
    rows = {row["id"]: row for row in (await snapshot(service, "acme"))["endpoints"]}
    assert set(rows) == {"e1", "e2"}
    assert (rows["e1"]["transport"], rows["e2"]["transport"], rows["e2"]["connected"]) == (None, "websocket", True)
    assert {row["id"] for row in (await snapshot(service, None))["endpoints"]} == {"e1", "e2", "e3"}
