"""One node of the cluster: its Store, its heartbeat, its share of expiry, and its mailbox.

`ClusterNode` is the node's `Store` (endpoint_core.journal): what a held copy changes
(subscriptions, acknowledged events) goes to Redis through fenced scripts, and
`committed()` says when, exactly as the SQLite store says it for its file. It also runs:

- the heartbeat (`heartbeat_seconds`): the node's entry in `eb:nodes`, the Redis clock,
  and the cluster epoch, whose change means Redis came back empty: the node then
  registers again, as UNKNOWN, the endpoints whose connections it holds;
- the sweep (`sweep_seconds`): every node runs cluster.scripts.SWEEP, which turns SICK,
  expires and releases the endpoints of nodes silent for `node_ttl_seconds`, each once,
  and this node emits the lifecycle events of the transitions it made;
- the leases (`lease_tick_seconds`): keepalives are written sparingly. A keepalive is
  written when the one Redis has is older than a third of the period (`LEASE_FRACTION`),
  so Redis lags by at most a third of a period plus a tick, and no endpoint turns SICK
  early; that is at most about three writes per period per endpoint, however often its
  client sends packets;
- the mailbox: channel `eb:node:{node}` carries "close" (another node took the endpoint
  over, unregistered or expired it), "wake" (QoS 1 events were queued for it), "event"
  (a QoS 0 event), "topic" (a client PUBLISH relayed to it), "sick" and "refresh" (its
  settings changed);
- the lifecycle channel `eb:lifecycle`: every event is made once, by the node that made
  the change, and its observers get it there; the other nodes' MQTT feeds and dashboard
  streams (the table's `peer_observers`) get it from this channel, best effort (not while
  Redis is unreachable, and not the webhook, which each node sends its own events to).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any

import orjson
from cachetools import TTLCache
from prometheus_client.core import Metric
from redis.exceptions import RedisError

from cluster.directory import Argument, ClusterUnavailable, Directory, EndpointEntry, entry_of, stream_id, text
from cluster.metrics import ClusterStats, families
from cluster.table import ClusterTable
from endpoint_core.clock import Clock, monotonic
from endpoint_core.endpoint import DisconnectReason, EndpointState, RemovalReason, UserEndpoint
from endpoint_core.journal import Change, DeleteEvent, PutEndpoint, Snapshot, StoreStats, StoreUnavailable
from endpoint_core.lifecycle import LifecycleEvent, LifecycleType
from endpoint_core.logtext import without_password

log = logging.getLogger("endpoint_broker.cluster")

LEASE_FRACTION = 1 / 3
LIFECYCLE_CHANNEL = "eb:lifecycle"
# Every this many heartbeats, a node checks that Redis lists it for no connection it lacks.
AUDIT_EVERY = 5
# Endpoints one sweep looks at, at most: the rest waits for the next sweep, not the loop.
SWEEP_LIMIT = 500

CLOSE_REASONS = {
    "taken over": DisconnectReason.TAKEN_OVER,
    "unregistered": DisconnectReason.UNREGISTERED,
    "expired": DisconnectReason.EXPIRED,
    "disconnected": DisconnectReason.CLEAN,
}


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Detach:
    """A held connection that ended, until Redis has taken it."""

    endpoint: UserEndpoint  # the copy as it was (for its DISCONNECTED event)
    epoch: int
    reason: DisconnectReason
    last_keepalive: float  # Redis time


class ClusterNode:
    def __init__(self, directory: Directory, table: ClusterTable, node_id: str, *,
                 heartbeat_seconds: float = 1.0, node_ttl_seconds: float = 5.0, sweep_seconds: float = 0.5,
                 lease_tick_seconds: float = 0.25, clock: Clock = monotonic) -> None:
        self.directory = directory
        self.table = table
        self.node_id = node_id
        self.channel = f"eb:node:{node_id}"
        self.heartbeat_seconds = heartbeat_seconds
        self.node_ttl_seconds = node_ttl_seconds
        self.sweep_seconds = sweep_seconds
        self.lease_tick_seconds = lease_tick_seconds
        self._clock = clock
        self._stats = StoreStats()
        self.cluster_stats = ClusterStats()
        self.redis_ok = False
        self.cluster_epoch: str | None = None
        self._listed = False  # whether a heartbeat of ours was ever seen in eb:nodes
        self._offset = 0.0  # Redis time minus our clock
        # Journal: changes waiting for the writer, and the futures of whoever waits for them.
        self._pending: list[tuple[Change, int]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Leases: held endpoints with keepalives Redis does not have yet, and when each was written.
        self._dirty: dict[str, UserEndpoint] = {}
        self._urgent: set[str] = set()
        self._written: dict[str, float] = {}
        # REST keepalives this node answered without writing: id -> (Redis time, our clock when due).
        self._deferred: dict[str, tuple[float, float]] = {}
        # Detaches Redis did not take yet (it was down, or the answer is on its way).
        self._undetached: dict[str, Detach] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._beats = 0
        self._orphans: set[str] = set()  # at the last audit
        # Endpoint id -> the newest epoch another node closed here lately (see superseded).
        self._closed: TTLCache[str, int] = TTLCache(maxsize=100_000, ttl=60)
        # Endpoints with a load from their stream in flight -> whether news came meanwhile.
        self._pulling: dict[str, bool] = {}
        self._detaching: set[asyncio.Task[None]] = set()
        self._stopping = False
        # Lifecycle events made here, on their way to the other nodes (`eb:lifecycle`).
        self._announcements: list[bytes] = []
        table.observers.append(self._announce)
        table.journal_to(self)
        table.on_keepalive = self._touched
        table.on_detach = self._detached

    # ------------------------------------------------------------ Store

    def load(self) -> Snapshot:
        return Snapshot()  # Redis is the table: nothing to restore into memory

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._spawn(self._every(self.heartbeat_seconds, self.heartbeat, first_at_once=True))
        self._spawn(self._every(self.sweep_seconds, self.sweep))
        self._spawn(self._every(self.lease_tick_seconds, self.renew))
        self._spawn(self._mailbox())

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]], first_at_once: bool = False) -> None:
        """Run `job` every `seconds` for the node's life: a bug in one run must not end the loop
        (a node without heartbeats is taken for dead; without leases, its endpoints turn SICK)."""
        if not first_at_once:
            await asyncio.sleep(seconds)
        while True:
            try:
                await job()
            except Exception:
                log.exception("cluster: %s failed; again in %ss", getattr(job, "__name__", job), seconds)
            await asyncio.sleep(seconds)

    def append(self, changes: Sequence[Change]) -> None:
        for change in changes:
            endpoint_id = change.record.id if isinstance(change, PutEndpoint) else \
                change.endpoint_id if isinstance(change, DeleteEvent) else None
            epoch = None if endpoint_id is None else self.table.epochs.get(endpoint_id)
            if epoch is not None:
                self._pending.append((change, epoch))
        if self._pending and self._writer is None:
            self._writer = self._spawn(self._write())

    def committed(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = (self._loop or asyncio.get_running_loop()).create_future()
        if not self._pending and self._writer is None:
            future.set_result(None)
        else:
            self._waiters.append(future)
        return future

    @property
    def healthy(self) -> bool:
        return self.redis_ok

    @property
    def stats(self) -> StoreStats:
        return self._stats

    async def close(self) -> None:
        """Finish the writes and detaches in flight, leave the cluster, and stop."""
        self._stopping = True
        in_flight = [task for task in (self._writer, *self._detaching) if task is not None]
        if in_flight:
            await asyncio.wait(in_flight, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await self.directory.redis.zrem("eb:nodes", self.node_id)  # leave now, not after node_ttl
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.directory.close()

    def cluster_metrics(self) -> Iterator[Metric]:
        """The node's own families (observability.metrics adds them to the service's)."""
        self.cluster_stats.redis_up = self.redis_ok
        return families(self.cluster_stats)

    def health(self) -> dict[str, Any]:
        return {"node": self.node_id, "redis": "ok" if self.redis_ok else "unreachable"}

    # ----------------------------------------------------------- journal

    async def _write(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                waiters, self._waiters = self._waiters, []
                started = time.perf_counter()
                try:
                    await self._write_batch(batch)
                except ClusterUnavailable as exc:
                    self._stats.failed_commits += 1
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(StoreUnavailable(str(exc)))
                    continue
                self._stats.commits += 1
                self._stats.rows_committed += len(batch)
                self._stats.last_batch_rows = len(batch)
                self._stats.commit_seconds_total += time.perf_counter() - started
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._writer = None
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:  # appended after the last batch was taken: nothing left to wait for
                if not waiter.done():
                    waiter.set_result(None)

    async def _write_batch(self, batch: list[tuple[Change, int]]) -> None:
        subscriptions: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}
        acknowledged: dict[tuple[str, int], list[str]] = {}
        for change, epoch in batch:
            if isinstance(change, PutEndpoint):
                subscriptions[(change.record.id, epoch)] = change.record.subscriptions
            elif isinstance(change, DeleteEvent):
                acknowledged.setdefault((change.endpoint_id, epoch), []).append(stream_id(change.seq))
        stale = []
        for (endpoint_id, epoch), topics in subscriptions.items():
            if text(await self.directory.run("SUBSCRIPTIONS", endpoint_id, self.node_id, epoch,
                                             orjson.dumps(dict(topics)))) == "stale":
                stale.append(endpoint_id)
        for (endpoint_id, epoch), ids in acknowledged.items():
            if text(await self.directory.run("ACKNOWLEDGE", endpoint_id, self.node_id, epoch, *ids)) == "stale":
                stale.append(endpoint_id)
        # Refused: another node holds it now. Its connection here closes before any answer
        # (a SUBACK waiting for this write is never sent on a closed connection).
        for endpoint_id in stale:
            self._lost(endpoint_id)

    def _lost(self, endpoint_id: str) -> None:
        copy = self.table.get(endpoint_id)
        if copy is not None:
            log.info("endpoint %s is no longer held by this node (taken over, or this node was presumed "
                     "dead); closing its connection", endpoint_id)
            self.table.forget(copy, DisconnectReason.TAKEN_OVER)

    # ------------------------------------------------------------ leases

    def redis_time(self, local: float) -> float:
        return local + self._offset

    def _touched(self, endpoint: UserEndpoint) -> None:
        if endpoint.state is not EndpointState.HEALTHY:
            # SICK (a sweep said so) or UNKNOWN: this packet revives it now, not at the next lease.
            endpoint.state = EndpointState.HEALTHY
            self._urgent.add(endpoint.id)
        self._dirty[endpoint.id] = endpoint

    def defer_keepalive(self, endpoint_id: str, at: float, stored: float, period: float) -> None:
        """A REST keepalive answered without a write: write it before Redis's copy could matter."""
        due_in = stored + period * LEASE_FRACTION - at
        previous = self._deferred.get(endpoint_id)
        due = self._clock() + max(0.0, due_in) if previous is None else previous[1]
        self._deferred[endpoint_id] = (at, due)

    async def renew(self, everything: bool = False) -> None:
        """Write the keepalives that are due (all held ones with `everything`), fenced."""
        now = self._clock()
        args: list[Argument] = []
        taken: list[tuple[str, UserEndpoint, float]] = []
        held = self.table.epochs
        candidates = {e.id: e for e in self.table} if everything else self._dirty
        for endpoint_id, endpoint in list(candidates.items()):
            epoch = held.get(endpoint_id)
            if endpoint.removed or epoch is None:
                self._dirty.pop(endpoint_id, None)
                continue
            period = self.table.period_of(endpoint)
            # Until a lease of ours is written, Redis has the keepalive its CONNECT wrote.
            written = self._written.get(endpoint_id, endpoint.connected_since or -math.inf)
            if everything or endpoint_id in self._urgent or now - written >= period * LEASE_FRACTION:
                args += [endpoint_id, self.redis_time(endpoint.last_keepalive), epoch]
                taken.append((endpoint_id, endpoint, written))
                self._written[endpoint_id] = endpoint.last_keepalive
                self._dirty.pop(endpoint_id, None)
                self._urgent.discard(endpoint_id)
        deferred = [(i, at) for i, (at, due) in self._deferred.items() if due <= now]
        for endpoint_id, at in deferred:
            del self._deferred[endpoint_id]
            args += [endpoint_id, at, ""]
        if not args:
            return
        self.cluster_stats.lease_writes += len(args) // 3
        try:
            answer = await self.directory.run("RENEW", self.node_id, self.cluster_epoch or "", *args)
            if len(answer) == 1:  # the cluster epoch changed: the heartbeat registers them again
                raise ClusterUnavailable("Redis came back empty")
            stale, revived = answer
        except ClusterUnavailable:
            for endpoint_id, endpoint, written in taken:  # again at the next tick
                self._written[endpoint_id] = written
                self._dirty[endpoint_id] = endpoint
            for endpoint_id, at in deferred:
                self._deferred.setdefault(endpoint_id, (at, now))
            return
        for raw in stale:
            self._lost(text(raw))
        for raw_id, left, record in revived:
            entry = entry_of(text(raw_id), record)
            self.table.emit(LifecycleType.STATE_CHANGED, entry, previous_state=EndpointState(text(left)))

    # -------------------------------------------------------- connections

    def _detached(self, endpoint: UserEndpoint, epoch: int, reason: DisconnectReason) -> None:
        self._dirty.pop(endpoint.id, None)
        self._written.pop(endpoint.id, None)
        self._undetached[endpoint.id] = Detach(endpoint, epoch, reason, self.redis_time(endpoint.last_keepalive))
        task = self._spawn(self._detach(endpoint.id))
        self._detaching.add(task)
        task.add_done_callback(self._detaching.discard)

    async def _detach(self, endpoint_id: str) -> None:
        """Tell Redis a held connection ended; its DISCONNECTED event is made once Redis took it,
        and not at all if the endpoint was another node's by then (that node reports it)."""
        pending = self._undetached.get(endpoint_id)
        if pending is None:
            return
        clean = pending.reason is DisconnectReason.CLEAN
        try:
            answer = await self.directory.run("DETACH", endpoint_id, self.node_id, pending.epoch, int(clean),
                                              pending.last_keepalive)
        except ClusterUnavailable:
            return  # retried after the next good heartbeat
        if self._undetached.get(endpoint_id) is pending:
            del self._undetached[endpoint_id]
        status = text(answer[0])
        if status == "stale":
            return
        self.table.emit_of(LifecycleType.DISCONNECTED, pending.endpoint, reason=pending.reason)
        if status == "removed":
            entry = entry_of(endpoint_id, answer[1])
            self.table.emit(LifecycleType.UNREGISTERED, entry, reason=RemovalReason.DISCONNECTED)
            log.info("endpoint %s removed: %s", endpoint_id, RemovalReason.DISCONNECTED)

    def superseded(self, endpoint_id: str, epoch: int) -> bool:
        """Whether a CONNECT granted `epoch` lost to a newer one before its copy was made here."""
        return self._closed.get(endpoint_id, 0) >= epoch

    def pull(self, endpoint_id: str) -> None:
        """Load, in stream order, what was queued for a held endpoint since the last load, and send it.

        The one way a held endpoint's QoS 1 events reach it (a wake from another node, this
        node's own sendEvent, a take-over, a resync): each load reads everything after the
        newest event loaded so far, so events whose news arrive out of order are never skipped.
        One load per endpoint runs at a time; news during it make it read once more.
        """
        if endpoint_id in self._pulling:
            self._pulling[endpoint_id] = True
            return
        self._pulling[endpoint_id] = False
        self._spawn(self._pull(endpoint_id))

    async def _pull(self, endpoint_id: str) -> None:
        try:
            again = True
            while again and endpoint_id in self.table.loaded:
                self._pulling[endpoint_id] = False
                try:
                    events = await self.directory.queued(endpoint_id, self.table.loaded[endpoint_id])
                except ClusterUnavailable:
                    return  # the mailbox's resync loads it once Redis answers again
                endpoint = self.table.get(endpoint_id)
                if endpoint is not None:
                    self.table.take(endpoint, events)
                again = self._pulling[endpoint_id]
        finally:
            del self._pulling[endpoint_id]

    # ---------------------------------------------------------- heartbeat

    async def heartbeat(self) -> None:
        before = self._clock()
        try:
            epoch, listed, at, nodes = await self.directory.run("HEARTBEAT", self.node_id, secrets.token_hex(8))
        except ClusterUnavailable as exc:
            if self.redis_ok:
                log.warning("Redis is unreachable (%s): registrations, QoS 1 events and CONNECTs answer "
                            "503 or CONNACK 3 until it is back", exc)
            self.redis_ok = False
            return
        self._offset = float(text(at)) - (before + self._clock()) / 2
        self.cluster_stats.nodes = int(nodes)
        recovered = not self.redis_ok
        if recovered:
            log.info("Redis is reachable at %s as node %s", without_password(self.directory.url), self.node_id)
        self.redis_ok = True
        epoch = text(epoch)
        if self.cluster_epoch is None:
            self.cluster_epoch = epoch
        elif epoch != self.cluster_epoch:
            log.warning("Redis came back empty (cluster epoch %s, was %s): registering the %d endpoint(s) "
                        "this node holds again, as UNKNOWN", epoch, self.cluster_epoch, len(self.table))
            if not await self._reregister():
                return  # again at the next heartbeat; leases wait for it (RENEW answers "epoch")
            self.cluster_epoch = epoch
        elif not listed and self._listed:
            log.warning("this node was presumed dead (no heartbeat for %ss): checking what it still holds",
                        self.node_ttl_seconds)
            await self.renew(everything=True)
        self._listed = True
        await self._settle_detaches()
        self._beats += 1
        if self._beats % AUDIT_EVERY == 0:
            await self._audit()

    async def _settle_detaches(self) -> None:
        """Detaches Redis did not take while it was unreachable, a few at a time."""
        pending = list(self._undetached)
        for start in range(0, len(pending), 100):
            await asyncio.gather(*(self._detach(i) for i in pending[start:start + 100]))

    async def _reregister(self) -> bool:
        """Register the held endpoints again in an empty Redis; False if Redis did not take them."""
        args: list[Argument] = []
        held = list(self.table)
        for endpoint in held:
            args += [endpoint.id, endpoint.user_id, endpoint.organization_id, endpoint.keep_alive_seconds,
                     int(endpoint.server_keep_alive_reminder_on), endpoint.origin.value, endpoint.version + 1,
                     "" if endpoint.link_keep_alive is None else endpoint.link_keep_alive,
                     int(endpoint.persistent_session), self.table.epochs.get(endpoint.id, 1),
                     orjson.dumps(endpoint.subscriptions)]
            self.table.loaded[endpoint.id] = 0  # the old stream ids are gone with the data
        if not args:
            return True
        try:
            done = await self.directory.run("REREGISTER", self.node_id, *args)
        except ClusterUnavailable:
            return False
        registered = set()
        for raw_id, record in done:
            entry = entry_of(text(raw_id), record)
            registered.add(entry.id)
            copy = self.table.get(entry.id)
            if copy is not None:
                copy.state, copy.version = entry.state, entry.version
            self.table.emit(LifecycleType.STATE_CHANGED, entry)
        for endpoint in held:
            if endpoint.id not in registered:  # taken meanwhile, by another node's CONNECT or a REST register
                self._lost(endpoint.id)
        return True

    async def _audit(self) -> None:
        """Release what Redis says this node holds but it does not, seen so at two audits in a row
        (a CONNECT's answer may be on its way at the first): a CONNECT whose answer was lost, or an
        earlier process under the same node id. Also forget leases of endpoints no longer held."""
        for endpoint_id in [i for i in self._written if i not in self.table.epochs]:
            del self._written[endpoint_id]
        try:
            members = await self.directory.redis.smembers(f"eb:n:{self.node_id}")
        except (RedisError, OSError):
            return
        orphans = {text(m) for m in members} - set(self.table.epochs)
        confirmed, self._orphans = orphans & self._orphans, orphans - self._orphans
        if not confirmed:
            return
        try:
            released = await self.directory.run("RELEASE", self.node_id, *sorted(confirmed))
        except ClusterUnavailable:
            return
        for raw_id, record in released:
            entry = entry_of(text(raw_id), record)
            log.info("endpoint %s released: this node does not hold its connection", entry.id)
            self.cluster_stats.expiry_steps["released"] += 1
            self.table.emit(LifecycleType.DISCONNECTED, entry, reason=DisconnectReason.DROPPED)

    # -------------------------------------------------------------- sweep

    async def sweep(self) -> None:
        if not self.redis_ok:
            return
        try:
            transitions = await self.directory.run("SWEEP", self.node_ttl_seconds, SWEEP_LIMIT)
        except ClusterUnavailable:
            return
        for transition in transitions:
            kind, endpoint_id = text(transition[0]), text(transition[1])
            self.cluster_stats.expiry_steps["released" if kind == "dropped" else kind] += 1
            if kind == "dropped":
                entry = entry_of(endpoint_id, transition[3])
                log.info("endpoint %s released: node %s stopped sending heartbeats", endpoint_id,
                         text(transition[2]))
                self.table.emit(LifecycleType.DISCONNECTED, entry, reason=DisconnectReason.DROPPED)
            elif kind == "sick":
                entry = entry_of(endpoint_id, transition[3])
                log.info("endpoint %s is SICK: no keepalive for %ss", endpoint_id, entry.keep_alive_seconds)
                self.table.emit(LifecycleType.STATE_CHANGED, entry, previous_state=EndpointState(text(transition[2])))
            elif kind == "expired":
                self._expired(endpoint_id, entry_of(endpoint_id, transition[2]), int(transition[3]))

    def _expired(self, endpoint_id: str, entry: EndpointEntry, queued: int) -> None:
        if queued:
            self.table.stats.dropped_endpoint_removed += queued
            log.warning("endpoint %s removed (%s) with %d undelivered QoS 1 event(s); they are dropped with it",
                        endpoint_id, RemovalReason.EXPIRED, queued)
        log.info("endpoint %s removed: %s", endpoint_id, RemovalReason.EXPIRED)
        if entry.node:
            self.table.emit(LifecycleType.DISCONNECTED, entry, reason=DisconnectReason.EXPIRED)
        self.table.emit(LifecycleType.UNREGISTERED, entry, reason=RemovalReason.EXPIRED)

    # ---------------------------------------------------------- lifecycle

    def _announce(self, event: LifecycleEvent) -> None:
        if not self._announcements and self._loop is not None:
            self._loop.call_soon(self._spawn_announce)
        self._announcements.append(self.node_id.encode() + b"\n" + orjson.dumps(_wire(event)))

    def _spawn_announce(self) -> None:
        self._spawn(self._publish_announcements())

    async def _publish_announcements(self) -> None:
        batch, self._announcements = self._announcements, []
        try:
            async with self.directory.redis.pipeline(transaction=False) as pipe:
                for message in batch:
                    pipe.publish(LIFECYCLE_CHANNEL, message)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.cluster_stats.announce_failures += len(batch)
            log.debug("%d lifecycle event(s) not announced to the other nodes: %s", len(batch), exc)

    def witness(self, message: bytes) -> None:
        """A lifecycle event from the channel: to the peer observers, unless this node made it."""
        node, _, body = message.partition(b"\n")
        if node.decode() == self.node_id:
            return
        event = _unwire(orjson.loads(body))
        for observer in self.table.peer_observers:
            try:
                observer(event)
            except Exception:
                log.exception("lifecycle observer failed on %s of %s", event.type, event.endpoint_id)

    # ------------------------------------------------------------ mailbox

    async def _mailbox(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.directory.subscriber()
            try:
                await pubsub.subscribe(self.channel, LIFECYCLE_CHANNEL)
                delay = 0.1
                await self._resync()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is None:
                        continue
                    try:
                        if message["channel"] == LIFECYCLE_CHANNEL.encode():
                            self.witness(bytes(message["data"]))
                        else:
                            self.deliver(bytes(message["data"]))
                    except Exception:
                        # One message we cannot read (another node's newer version, say) must not
                        # end the mailbox: wakes and closes come through it.
                        log.exception("cluster: a message on %s could not be handled: %r", message["channel"],
                                      bytes(message["data"])[:200])
            except (RedisError, OSError, ClusterUnavailable) as exc:
                log.debug("mailbox: %s; subscribing again", exc)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)  # wakes published meanwhile are lost: back soon, then resync

    async def _resync(self) -> None:
        """After (re)subscribing, messages may have been missed: load every held queue, read every
        held endpoint's settings again (a REST re-registration's "refresh"), and renew them all."""
        for endpoint_id in list(self.table.loaded):
            self.pull(endpoint_id)
        await self._refresh(*self.table.epochs)
        if self.table.epochs:
            await self.renew(everything=True)

    def deliver(self, message: bytes) -> None:
        """One message from another node (see the module docstring)."""
        head, _, rest = message.partition(b"\n")
        kind, _, args = head.decode().partition(" ")
        if kind == "event":
            for endpoint_id in args.split():
                endpoint = self.table.get(endpoint_id)
                if endpoint is not None:
                    self.table.deliver((endpoint,), rest, 0)
        elif kind == "wake":
            for endpoint_id in args.split():
                self.pull(endpoint_id)
        elif kind == "close":
            endpoint_id, epoch, reason = args.split(" ", 2)
            # Kept for a CONNECT whose copy is not made yet: a newer one elsewhere already won.
            self._closed[endpoint_id] = max(int(epoch), self._closed.get(endpoint_id, 0))
            endpoint = self.table.get(endpoint_id)
            if endpoint is not None and self.table.epochs.get(endpoint_id, 0) <= int(epoch):
                self.table.forget(endpoint, CLOSE_REASONS.get(reason, DisconnectReason.TAKEN_OVER))
        elif kind == "topic" or kind == "topic":  # a client PUBLISH relayed from another node, on one topic
            endpoint_id, size = args.split(" ")
            topic, payload = rest[:int(size)].decode(), rest[int(size):]
            endpoint = self.table.get(endpoint_id)
            if endpoint is not None:
                self.table.publish_on(endpoint, topic, payload)
        elif kind == "sick":
            endpoint = self.table.get(args)
            if endpoint is not None:
                self.table.set_state(endpoint, EndpointState.SICK)
        elif kind == "refresh":
            self._spawn(self._refresh(args))

    async def _refresh(self, *endpoint_ids: str) -> None:
        """A REST registration changed held endpoints' settings: their period and reminder follow.
        One round trip for all of them."""
        if not endpoint_ids:
            return
        try:
            async with self.directory.redis.pipeline(transaction=False) as pipe:
                for endpoint_id in endpoint_ids:
                    pipe.hmget(f"eb:ep:{endpoint_id}", "k", "r", "g")
                settings = await pipe.execute()
        except (RedisError, OSError):
            return
        for endpoint_id, (k, r, g) in zip(endpoint_ids, settings, strict=True):
            endpoint = self.table.get(endpoint_id)
            if endpoint is not None and k is not None:
                self.table.refresh(endpoint, int(k), r == b"1", text(g))

    # ------------------------------------------------------------ helpers

    def spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run `job` for the node, kept until done, its failure logged (for the service's own jobs)."""
        return self._spawn(job)

    def _spawn(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(job) if self._loop is None \
            else self._loop.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("cluster task failed", exc_info=task.exception())


def _wire(event: LifecycleEvent) -> dict[str, Any]:
    """A lifecycle event as it crosses to the other nodes: every field, the same id."""
    event.id  # noqa: B018 - drawn now, so that every node has the same
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    fields["type"] = event.type.value
    return fields


def _unwire(fields: dict[str, Any]) -> LifecycleEvent:
    return LifecycleEvent(**{**fields, "type": LifecycleType(fields["type"])})
