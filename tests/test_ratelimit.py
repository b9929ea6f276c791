"""Rate limits on a fake clock: the buckets, and the service that applies them (unit tests of the core)."""

from __future__ import annotations

import time

import pytest

from endpoint_core.errors import RateLimited
from endpoint_core.principals import JwtVerifier, Principal
from endpoint_core.ratelimit import RateLimitPolicy, TokenBuckets
from endpoint_core.service import EndpointService
from endpoint_core.table import EndpointTable, TablePolicy
from tests.test_table import Clock, FakeLink

SECRET = "unit-secret-0123456789-0123456789-0123456789"
EVENT = {"type": "CallCreatedEvent", "timestamp": "2011-12-03T10:15:30Z"}


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [buckets.wait_for("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.wait_for("k") == pytest.approx(0.5)  # empty: one token comes back every 1 / rate s
    clock.now += 0.5
    assert buckets.wait_for("k") == 0.0
    assert buckets.wait_for("k") > 0
    clock.now += 100
    assert [buckets.wait_for("k") for _ in range(4)][:3] == [0.0, 0.0, 0.0]  # refills up to the burst only


def test_buckets_are_per_key() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, clock=Clock())
    assert buckets.wait_for("a") == 0.0
    assert buckets.wait_for("a") > 0
    assert buckets.wait_for("b") == 0.0


def test_a_rate_of_zero_is_off_and_keeps_no_state() -> None:
    buckets = TokenBuckets(rate=0.0, burst=1, clock=Clock())
    assert all(buckets.wait_for(n) == 0.0 for n in range(1000))
    assert len(buckets) == 0


def test_state_stays_bounded_in_memory() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1.0, burst=5, clock=clock, max_keys=100)
    for n in range(10_000):
        buckets.wait_for(n)
    assert len(buckets) == 100
    clock.now += 5  # burst / rate: every bucket would be full again, so all are forgotten
    buckets.wait_for("x")
    assert len(buckets) == 1


def test_take_raises_with_the_time_to_retry() -> None:
    buckets = TokenBuckets(rate=0.25, burst=1, clock=Clock())
    buckets.take("k", "things")
    with pytest.raises(RateLimited) as caught:
        buckets.take("k", "things")
    assert caught.value.retry_after_seconds == pytest.approx(4.0)


# ------------------------------------------------------------- the service


def make_service(clock: Clock, **limits: float) -> EndpointService:
    table = EndpointTable(TablePolicy(max_endpoints_per_user=1000), clock=clock)
    return EndpointService(table, JwtVerifier(secret=SECRET), limits=RateLimitPolicy(**limits), clock=clock)  # type: ignore[arg-type]


ALICE = Principal("alice", "acme", False, time.time() + 3600)
BOB = Principal("bob", "acme", False, time.time() + 3600)
ALICE_ELSEWHERE = Principal("alice", "other", False, time.time() + 3600)
BACKEND = Principal("backend", None, True, time.time() + 3600)


def test_registrations_are_limited_per_user_and_organisation() -> None:
    clock = Clock()
    service = make_service(clock, register_rate_per_second=1, register_burst=2)
    for n in range(2):
        service.register(ALICE, {"keepAliveSeconds": 30, "userEndpointId": f"a{n}"})
    with pytest.raises(RateLimited):
        service.register(ALICE, {"keepAliveSeconds": 30, "userEndpointId": "a2"})
    with pytest.raises(RateLimited):  # a refused attempt counts as well as a good one: it is checked first
        service.register(ALICE, {"keepAliveSeconds": "bad"})
    service.register(BOB, {"keepAliveSeconds": 30, "userEndpointId": "b0"})
    service.register(ALICE_ELSEWHERE, {"keepAliveSeconds": 30, "userEndpointId": "o0"})
    clock.now += 1
    service.register(ALICE, {"keepAliveSeconds": 30, "userEndpointId": "a2"})


def test_send_event_is_off_by_default_and_limited_per_caller_when_set() -> None:
    clock = Clock()
    unlimited = make_service(clock)
    for _ in range(3000):  # above the default burst: the default rate 0 is off
        unlimited.send_event(BACKEND, {"userId": "u", "organizationId": "acme", "event": EVENT})
    limited = make_service(clock, send_event_rate_per_second=10, send_event_burst=3)
    for _ in range(3):
        limited.send_event(BACKEND, {"userId": "u", "organizationId": "acme", "event": EVENT})
    with pytest.raises(RateLimited) as caught:
        limited.send_event(BACKEND, {"userId": "u", "organizationId": "acme", "event": EVENT})
    assert caught.value.retry_after_seconds == pytest.approx(0.1)
    limited.send_event(ALICE, {"userId": "alice", "event": EVENT})  # another caller, another bucket


def test_connects_are_limited_per_client_id() -> None:
    clock = Clock()
    service = make_service(clock, connect_rate_per_second=2, connect_burst=10)
    for _ in range(10):
        service.connect(ALICE, "tab", 30, FakeLink(), persistent_session=False)
    with pytest.raises(RateLimited) as caught:
        service.connect(ALICE, "tab", 30, FakeLink(), persistent_session=False)
    assert caught.value.retry_after_seconds == pytest.approx(0.5)
    service.connect(ALICE, "other-tab", 30, FakeLink(), persistent_session=False)
    clock.now += 0.5
    service.connect(ALICE, "tab", 30, FakeLink(), persistent_session=False)


def test_the_defaults_are_the_issues() -> None:
    assert RateLimitPolicy() == RateLimitPolicy(0, 2000, 20, 200, 2, 10)


def test_over_max_keys_the_least_recently_used_bucket_goes_first() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, clock=Clock(), max_keys=2)
    assert buckets.wait_for("a") == 0.0 and buckets.wait_for("b") == 0.0
    assert buckets.wait_for("a") > 0  # "a" is empty, and now the most recently used
    buckets.wait_for("c")  # over max_keys: "b" goes, not "a"
    assert len(buckets) == 2
    assert buckets.wait_for("a") > 0  # still remembered as empty
    assert buckets.wait_for("b") == 0.0  # forgotten, so full again
