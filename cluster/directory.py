"""The cluster's shared table in Redis: one async method per script in cluster.scripts.

Each method is one round trip, and each answer is what the script decided. Errors
from Redis (down, paused, loading its AOF) become `ClusterUnavailable`, which the
service answers as 503 over HTTP and CONNACK 3 over MQTT.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry

from cluster import scripts
from endpoint_core.endpoint import EndpointState, Origin, UserEndpoint, endpoint_view
from endpoint_core.table import TablePolicy

Argument = bytes | str | int | float

# Connections to Redis per node for commands (the mailbox has one more of its own).
MAX_CONNECTIONS = 64
# Each call waits this long for Redis at most: a paused or unreachable Redis answers 503 by then.
DEFAULT_TIMEOUT_SECONDS = 2.0


class ClusterUnavailable(Exception):
    """Redis could not be reached or did not answer in time; the message says why."""


@dataclass(frozen=True, slots=True)
class EndpointEntry:
    """One endpoint as Redis holds it (cluster.scripts, key `eb:ep:{id}`)."""

    id: str
    user_id: str
    organization_id: str
    keep_alive_seconds: int
    reminder_on: bool
    origin: Origin
    version: int
    state: EndpointState
    last_keepalive: float  # Redis time
    node: str  # "" when no node holds a connection
    link_keep_alive: int | None
    connected_since: float | None  # Unix time
    epoch: int
    persistent_session: bool
    subscriptions: dict[str, int]
    transport: str | None = None  # of its connection: tcp, tls or websocket

    def view(self, now: float) -> dict[str, Any]:
        """The UserEndpointView, as a process answers it (endpoint_view); `now` is Redis time."""
        return endpoint_view(self.as_endpoint(), self.node != "", self.connected_since, now - self.last_keepalive)

    def as_endpoint(self) -> UserEndpoint:
        """A detached UserEndpoint with this entry's fields, for a lifecycle event of it."""
        return UserEndpoint(self.id, self.user_id, self.organization_id, self.keep_alive_seconds, self.reminder_on,
                            self.origin, 0.0, state=self.state, version=self.version,
                            persistent_session=self.persistent_session, subscriptions=dict(self.subscriptions))


def entry_of(endpoint_id: str, flat: Sequence[bytes]) -> EndpointEntry:
    """Parse an HGETALL reply (field, value, field, value, ...) of the endpoint `endpoint_id`."""
    f = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    link_keep_alive = f.get("lk", "")
    connected_since = f.get("cs", "")
    return EndpointEntry(
        id=endpoint_id,
        user_id=f["u"],
        organization_id=f["o"],
        keep_alive_seconds=int(f["k"]),
        reminder_on=f["r"] == "1",
        origin=Origin(f["g"]),
        version=int(f["v"]),
        state=EndpointState(f["s"]),
        last_keepalive=float(f["l"]),
        node=f.get("n", ""),
        link_keep_alive=int(link_keep_alive) if link_keep_alive else None,
        connected_since=float(connected_since) if connected_since else None,
        epoch=int(f.get("e", "0")),
        persistent_session=f.get("p") == "1",
        subscriptions={str(k): int(v) for k, v in json.loads(f.get("sb") or "{}").items()},
        transport=f.get("t") or None,
    )


def text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def stream_seq(stream_id: str) -> int:
    """A stream id ("ms-n") as the outbox's integer sequence number, in the same order."""
    ms, _, n = stream_id.partition("-")
    return (int(ms) << 20) | int(n)


def stream_id(seq: int) -> str:
    return f"{seq >> 20}-{seq & 0xFFFFF}"


@dataclass(frozen=True, slots=True)
class Grace:
    """The expiry rule every script needs: ARGV[1] and ARGV[2]."""

    ratio: float
    minimum: float

    @classmethod
    def of(cls, policy: TablePolicy) -> Grace:
        return cls(policy.expiry_grace_ratio, policy.min_expiry_grace_seconds)


class Directory:
    """The scripts, bound to one Redis client."""

    def __init__(self, url: str, policy: TablePolicy, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
        self.url = url
        self.policy = policy
        # A bounded pool that waits for a free connection: redis-py's default pool raises "Too many
        # connections" past 100, which turned bursts of concurrent requests into 503s.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=MAX_CONNECTIONS, timeout=timeout,
            socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False,
            health_check_interval=0, decode_responses=False,
            # Once, at once: a pooled connection may be stale after Redis restarted; more would
            # only hold the caller past its timeout while Redis is down.
            retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError],
        )
        self.redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        # The mailbox's own client, which never reconnects behind our back: a subscription lost
        # with its connection must surface, so that the node loads what it may have missed.
        self._mailbox: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            health_check_interval=0, decode_responses=False,
        )
        self._grace = Grace.of(policy)
        self._scripts = {name: self.redis.register_script(getattr(scripts, name)) for name in (
            "REGISTER", "KEEPALIVE", "RENEW", "UNREGISTER", "VIEW", "LIST", "CONNECT", "DETACH",
            "SUBSCRIPTIONS", "ACKNOWLEDGE", "SEND", "HEARTBEAT", "SWEEP", "REREGISTER", "RELEASE", "RELAY",
        )}

    async def run(self, name: str, *args: Argument) -> Any:
        argv: list[Argument] = [self._grace.ratio, self._grace.minimum, *args]
        try:
            return await self._scripts[name](keys=[], args=argv)
        except RedisError as exc:
            raise ClusterUnavailable(f"Redis: {exc or type(exc).__name__}") from None
        except OSError as exc:
            raise ClusterUnavailable(f"Redis: {exc}") from None

    async def queued(self, endpoint_id: str, after: int) -> list[tuple[int, bytes]]:
        """An endpoint's queued events after the sequence number `after` (0: all), oldest first."""
        start = "-" if after == 0 else f"({stream_id(after)}"
        try:
            entries = await self.redis.xrange(f"eb:q:{endpoint_id}", start, "+") or []
        except RedisError as exc:
            raise ClusterUnavailable(f"Redis: {exc or type(exc).__name__}") from None
        # decode_responses is off, so every value is bytes.
        return [(stream_seq(text(sid)), fields[b"p"]) for sid, fields in entries if fields]  # type: ignore[misc]

    def subscriber(self) -> PubSub:
        return self._mailbox.pubsub()

    async def close(self) -> None:
        await self.redis.aclose()
        await self._mailbox.aclose()
