"""The cluster's rules, one script at a time (cluster.scripts), against a real Redis and no node.

These are the rules that span nodes: each is checked and applied in one script, so
each can be tested with the script alone. Redis's clock is moved by rewriting the
stored keepalive (`l`) into the past, never by waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cluster.directory import Directory, EndpointEntry, entry_of, text
from endpoint_core.table import TablePolicy
from tests.redis_support import RedisServer

POLICY = TablePolicy()
GRACE = (POLICY.expiry_grace_ratio, POLICY.min_expiry_grace_seconds)


@pytest.fixture
async def directory(redis_server: RedisServer) -> AsyncIterator[Directory]:
    opened = Directory(redis_server.url, POLICY)
    yield opened
    await opened.close()


async def connect(directory: Directory, endpoint_id: str, node: str = "n1", keep_alive: int = 60,
                  user: str = "alice", persistent: bool = False) -> list[object]:
    answer: list[object] = await directory.run("CONNECT", endpoint_id, user, "org", keep_alive, node,
                                               int(persistent), 60, 86_400, 100, "tcp")
    return answer


async def age(directory: Directory, endpoint_id: str, seconds: float) -> None:
    """Make the endpoint's last keepalive `seconds` older."""
    key = f"eb:ep:{endpoint_id}"
    last = float(text(await directory.redis.hget(key, "l")))
    await directory.redis.hset(key, "l", last - seconds)
    await directory.redis.zadd("eb:due", {endpoint_id: 0})  # so the next sweep looks at it


async def stored(directory: Directory, endpoint_id: str) -> EndpointEntry:
    fields = await directory.redis.hgetall(f"eb:ep:{endpoint_id}")
    return entry_of(endpoint_id, [part for pair in fields.items() for part in pair])


async def test_a_stale_node_changes_nothing(directory: Directory) -> None:
    first = await connect(directory, "e1", node="n1")
    epoch = entry_of("e1", first[5]).epoch  # type: ignore[arg-type]
    taken = await connect(directory, "e1", node="n2")
    assert text(taken[2]) == "n1"  # the previous node, told to close its connection
    for script, args in (("DETACH", ("e1", "n1", epoch, 0, 0)), ("SUBSCRIPTIONS", ("e1", "n1", epoch, b"{}")),
                         ("ACKNOWLEDGE", ("e1", "n1", epoch, "1-0"))):
        answer = await directory.run(script, *args)
        assert text(answer if isinstance(answer, bytes) else answer[0]) == "stale", script
    epoch_now = text(await directory.redis.hget("eb:ep:e1", "e"))
    await directory.redis.set("eb:epoch", "c1")
    stale, revived = await directory.run("RENEW", "n1", "c1", "e1", 9e9, epoch)
    assert [text(i) for i in stale] == ["e1"] and revived == []
    record = await stored(directory, "e1")
    assert (record.node, str(record.epoch)) == ("n2", epoch_now) and record.last_keepalive < 9e9


async def test_renewal_waits_for_the_heartbeat_when_redis_came_back_empty(directory: Directory) -> None:
    await connect(directory, "e1")
    assert [text(x) for x in await directory.run("RENEW", "n1", "an-old-epoch", "e1", 1.0, 1)] == ["epoch"]


async def test_concurrent_sweeps_expire_an_endpoint_once(directory: Directory, redis_server: RedisServer) -> None:
    await directory.run("REGISTER", "e1", "alice", "org", 10, 0, 100)
    await age(directory, "e1", 11)  # past its deadline: SICK
    others = [Directory(redis_server.url, POLICY) for _ in range(3)]
    try:
        sweeps = await asyncio.gather(*(d.run("SWEEP", 5, 100) for d in [directory, *others]))
        assert [text(t[0]) for s in sweeps for t in s] == ["sick"]
        await age(directory, "e1", 5)  # and past its grace (half the period): gone
        sweeps = await asyncio.gather(*(d.run("SWEEP", 5, 100) for d in [directory, *others]))
        assert [text(t[0]) for s in sweeps for t in s] == ["expired"]
        assert not await directory.redis.exists("eb:ep:e1", "eb:q:e1")
        assert not await directory.redis.sismember("eb:u:org\0alice", "e1")
    finally:
        for other in others:
            await other.close()


async def test_a_dead_nodes_connections_are_released_once(directory: Directory) -> None:
    await connect(directory, "e1", node="dead")
    await directory.redis.zadd("eb:nodes", {"dead": 1.0})  # its last heartbeat, long ago
    first, second = await directory.run("SWEEP", 5, 100), await directory.run("SWEEP", 5, 100)
    assert [(text(t[0]), text(t[1]), text(t[2])) for t in first] == [("dropped", "e1", "dead")] and second == []
    record = await stored(directory, "e1")
    assert record.node == "" and record.link_keep_alive is None


async def test_a_connection_with_keep_alive_zero_holds_its_endpoint_until_it_ends(directory: Directory) -> None:
    answer = await connect(directory, "e1", keep_alive=0)
    epoch = entry_of("e1", answer[5]).epoch  # type: ignore[arg-type]
    await age(directory, "e1", 10_000)
    assert await directory.run("SWEEP", 5, 100) == []
    assert await directory.redis.zscore("eb:due", "e1") is None  # no deadline while connected
    assert [text(x) for x in await directory.run("DETACH", "e1", "n1", epoch, 0, 0)] == ["detached"]
    assert await directory.redis.zscore("eb:due", "e1") is not None  # its end is its last sign of life


async def test_queues_are_bounded_and_idempotency_keys_answer_the_first_count(directory: Directory) -> None:
    await connect(directory, "e1")
    def send(key: str = "", digest: str = "", payload: bytes = b"x" * 10) -> object:
        return directory.run("SEND", "org", "alice", "", 1, payload, 2, 25, "n2", key, digest, 60_000)

    first, second, third = [await send() for _ in range(3)]
    assert [int(first[1]), int(second[1]), int(third[1])] == [1, 1, 0]  # type: ignore[index]
    assert [text(i) for i in third[2]] == ["e1"]  # type: ignore[index]  # full: 2 events at most
    await directory.redis.delete("eb:q:e1")
    await directory.redis.hset("eb:ep:e1", "qb", 0)
    assert int((await send(payload=b"x" * 30))[1]) == 0  # type: ignore[index]  # full: 25 bytes at most
    done = await send("eb:idem:k", "d1")
    again = await send("eb:idem:k", "d2")
    assert text(done[0]) == "ok" and [text(x) for x in again] == ["prior", "d1 1"]  # type: ignore[index]
    assert await directory.redis.xlen("eb:q:e1") == 1  # the retry queued nothing


async def test_a_blocking_unregister_refuses_connects_everywhere_until_its_block_ends(directory: Directory) -> None:
    await connect(directory, "e1")
    removed = await directory.run("UNREGISTER", "e1", "alice", "org", 0, 60)
    assert text(removed[0]) == "removed"
    assert [text(x) for x in await connect(directory, "e1")] == ["blocked"]
    await directory.redis.delete("eb:blk:e1")  # the block's TTL ran out
    assert text((await connect(directory, "e1"))[0]) == "ok"


async def test_views_are_scoped_to_the_callers_organisation_and_user(directory: Directory) -> None:
    await directory.run("REGISTER", "e1", "alice", "org", 60, 0, 100)
    assert text((await directory.run("VIEW", "e1", "alice", "org", 0))[0]) == "ok"
    assert text((await directory.run("VIEW", "e1", "bob", "org", 0))[0]) == "forbidden"
    assert text((await directory.run("VIEW", "e1", "alice", "elsewhere", 0))[0]) == "notfound"
    assert text((await directory.run("VIEW", "e1", "backend", "", 1))[0]) == "ok"
    assert text((await directory.run("KEEPALIVE", "e1", "bob", "org", 0, 1 / 3))[0]) == "forbidden"
    assert text((await directory.run("UNREGISTER", "e1", "alice", "elsewhere", 0, 0))[0]) == "notfound"


async def test_a_relayed_publish_goes_to_the_holding_node_of_the_same_organisation_only(directory: Directory) -> None:
    await connect(directory, "e1", node="n2")
    def relay(org: str, user: str = "") -> object:
        return directory.run("RELAY", org, "e1", user, "users/endpoints/e1", b"hi", "n1")

    assert await relay("elsewhere") == 0
    assert await relay("org", "mallory") == 0  # the topic's user form names someone else
    assert await relay("org", "alice") == 1
    assert await directory.run("RELAY", "org", "e1", "", "users/endpoints/e1", b"hi", "n2") == 0  # held here


async def test_after_a_gap_with_no_sweep_every_step_holds_for_a_node_ttl(directory: Directory) -> None:
    await connect(directory, "e1", node="n2")
    await directory.run("SWEEP", 5, 100)  # the last sweep before Redis froze, say
    await directory.redis.set("eb:swept", float(text(await directory.redis.get("eb:swept"))) - 10)
    await directory.redis.zadd("eb:nodes", {"n2": 1.0})  # its heartbeats stopped with Redis
    await age(directory, "e1", 10_000)
    assert await directory.run("SWEEP", 5, 100) == []  # held: heartbeats and leases catch up first
    await directory.redis.delete("eb:hold")  # a node TTL later
    assert [text(t[0]) for t in await directory.run("SWEEP", 5, 100)] == ["dropped", "expired"]
