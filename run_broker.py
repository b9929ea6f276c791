#!/usr/bin/env python3
"""endpoint-broker: the MQTT broker and the HTTP bridge in one process, on one event loop.

    python run_broker.py [--host H] [--mqtt-port P] [--http-port P] [--config FILE] [--log-level L]
                         [--log-format text|json] [--metrics-port P] [--metrics-enabled | --no-metrics]
                         [--tls-cert FILE --tls-key FILE [--mqtts-port P] [--tls-client-ca FILE]]
                         [--redis-url redis://HOST:PORT/DB [--node-id ID]]
    python run_broker.py token --user U --org O [--role SERVICE] [--ttl SECONDS]
    python run_broker.py genconfig > config.yaml

With --tls-cert and --tls-key the HTTP port serves HTTPS (and wss:// at /ws) and MQTT over TLS
listens on --mqtts-port; SIGHUP reloads the certificate and key. With --redis-url the process
is a node of a cluster whose endpoint table is in Redis (README, "Cluster").

Every setting also has an environment variable (ENDPOINT_BROKER_<NAME>); see config/settings.py.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import shlex
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette

from broker_plugin.runtime import MqttRuntime, MqttSettings
from config import ConfigError, Settings, load_settings
from config.log_output import configure_logging
from config.tls import ServerTls, TlsFiles
from endpoint_core.feeds import LifecycleFeeds
from endpoint_core.idempotency import IdempotencyKeys
from endpoint_core.journal import Snapshot, Store
from endpoint_core.logtext import without_password
from endpoint_core.principals import ClaimNames, JwtVerifier, mint_token
from endpoint_core.service import EndpointService
from endpoint_core.table import EndpointTable
from http_bridge.app import create_app
from http_bridge.connections import fd_reserve, guarded_protocol, max_connections_for
from http_bridge.dashboard import DashboardPolicy
from http_bridge.webhook import WebhookSender, webhook_queue
from store import DATABASE_FILE, MemoryStore, SqliteStore, StoreFileError

log = logging.getLogger("endpoint_broker")

DEV_USER, DEV_ORG, DEV_TOKEN_TTL = "dev-user", "dev-org", 24 * 3600


def claim_names(settings: Settings) -> ClaimNames:
    return ClaimNames(
        user=settings.jwt_user_claim,
        user_fallback=settings.jwt_user_fallback_claim,
        organization=settings.jwt_organization_claim,
        roles=settings.jwt_roles_claim,
        service_roles=frozenset(settings.jwt_service_roles),
    )


def build_verifier(settings: Settings, dev_secret: str | None) -> JwtVerifier:
    try:
        public_key = Path(settings.jwt_public_key_file).read_bytes() if settings.jwt_public_key_file else None
    except OSError as exc:
        raise ConfigError(f"jwt_public_key_file {settings.jwt_public_key_file!r}: {exc.strerror}") from None
    try:
        return JwtVerifier(
            secret=settings.jwt_secret or dev_secret,
            public_key_pem=public_key,
            algorithms=settings.jwt_algorithms,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            leeway_seconds=settings.jwt_leeway_seconds,
            claims=claim_names(settings),
        )
    except ValueError as exc:
        raise ConfigError(f"JWT settings: {exc}") from None


DEV_SECRET_FILE = "dev-secret"  # noqa: S105 - a file name


def data_dir(settings: Settings) -> Path:
    """The data directory, created owner-only (0700) when it does not exist."""
    path = Path(settings.data_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"data_dir {settings.data_dir!r} cannot be created: {exc.strerror}") from None
    return path


def open_store(settings: Settings) -> Store:
    if settings.store == "memory":
        return MemoryStore()
    try:
        return SqliteStore(data_dir(settings) / DATABASE_FILE, settings.store_synchronous,  # type: ignore[arg-type]
                           settings.store_max_bytes)
    except StoreFileError as exc:
        raise ConfigError(str(exc)) from None


def dev_secret_of(settings: Settings) -> str:
    """Dev mode's random secret: kept in the data dir (0600), so printed tokens outlive a restart."""
    if settings.store == "memory":
        return secrets.token_urlsafe(32)
    path = data_dir(settings) / DEV_SECRET_FILE
    try:
        if path.exists():
            return path.read_text().strip()
        secret = secrets.token_urlsafe(32)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(secret + "\n")
    except OSError as exc:
        raise ConfigError(f"dev mode's secret file {str(path)!r}: {exc.strerror}") from None
    return secret


def build_app(settings: Settings, tls: ServerTls | None = None) -> Starlette:
    """Wire the domain core, the store, the broker and the bridge together."""
    dev_secret = dev_secret_of(settings) if settings.dev_mode else None
    verifier = build_verifier(settings, dev_secret)
    idempotency = IdempotencyKeys(settings.idempotency_window_seconds)
    feeds = LifecycleFeeds(settings.lifecycle_mqtt_queue_max_events, settings.ack_timeout_seconds)
    if settings.redis_url:
        service: EndpointService = build_cluster_service(settings, verifier, idempotency, feeds)
        store: Store = service.store  # type: ignore[assignment]
        snapshot = Snapshot()
        table = service.table
    else:
        store = open_store(settings)
        snapshot = store.load()
        table = EndpointTable(settings.table_policy(), journal=store)
        idempotency.restore(snapshot.idempotency)
        service = EndpointService(table, verifier, store, idempotency, limits=settings.rate_limit_policy(),
                                  feeds=feeds)
    webhook = None
    if settings.lifecycle_webhook_url:
        webhook = WebhookSender(settings.lifecycle_webhook_url, settings.lifecycle_webhook_secret,
                                webhook_queue(table, settings.webhook_policy(), store, snapshot.webhook_events),
                                settings.webhook_policy())
    elif snapshot.webhook_events:
        log.warning("%d lifecycle event(s) stored for the webhook are kept, undelivered: "
                    "lifecycle_webhook_url is not set", len(snapshot.webhook_events))
    mqtt = MqttRuntime(service, MqttSettings(
        host=settings.host,
        port=settings.mqtt_port,
        limits=settings.connection_limits(),
        max_pending_connects=settings.mqtt_max_pending_connects,
        tls_port=settings.mqtts_port,
        ssl_context=None if tls is None else tls.mqtt,
        client_publish_allow=tuple(settings.client_publish_allow),
    ))

    def on_starting() -> None:
        # Restored just before the listeners open: a restored endpoint's period runs from here.
        table.restore(snapshot)
        if snapshot.endpoints:
            log.info("restored %d endpoint(s) and %d queued event(s) from %s", len(snapshot.endpoints),
                     sum(len(events) for events in snapshot.events.values()), settings.data_dir)

    def on_started() -> None:
        http, ws = ("https", "wss") if tls else ("http", "ws")
        log.info("HTTP bridge on %s://%s:%d, MQTT over WebSocket at %s://%s:%d/ws",
                 http, settings.host, settings.http_port, ws, settings.host, settings.http_port)
        if dev_secret is not None:
            print_dev_banner(settings, dev_secret)

    return create_app(service, mqtt, store, max_body_bytes=settings.max_body_bytes,
                      cors_allow_origins=settings.cors_allow_origins, on_starting=on_starting,
                      on_started=on_started, metrics_enabled=settings.metrics_enabled,
                      metrics_port=settings.metrics_port, metrics_host=settings.host,
                      webhook=webhook,
                      dashboard=DashboardPolicy(settings.dashboard_max_streams, settings.dashboard_stream_queue_events))


def build_cluster_service(settings: Settings, verifier: JwtVerifier, idempotency: IdempotencyKeys,
                          feeds: LifecycleFeeds) -> EndpointService:
    """A node of the cluster in settings.redis_url: its table holds only what its connections need."""
    from cluster.directory import Directory  # noqa: PLC0415 - redis is imported only by nodes
    from cluster.node import ClusterNode  # noqa: PLC0415
    from cluster.service import ClusterService  # noqa: PLC0415
    from cluster.table import ClusterTable  # noqa: PLC0415

    assert settings.redis_url is not None
    policy = settings.table_policy()
    table = ClusterTable(policy)
    node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
    node = ClusterNode(Directory(settings.redis_url, policy), table, node_id,
                       node_ttl_seconds=settings.cluster_node_ttl_seconds)
    log.info("cluster node %s of %s", node_id, without_password(settings.redis_url))
    return ClusterService(table, node, verifier, idempotency=idempotency, limits=settings.rate_limit_policy(),
                          feeds=feeds)


def print_dev_banner(settings: Settings, dev_secret: str) -> None:
    token = mint_token(dev_secret, user_id=DEV_USER, organization_id=DEV_ORG, ttl_seconds=DEV_TOKEN_TTL,
                       claims=claim_names(settings), issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    base = f"{'https' if settings.tls else 'http'}://{settings.host}:{settings.http_port}"
    body = '{"keepAliveSeconds": 60}'
    log.warning("DEV MODE: no ENDPOINT_BROKER_JWT_SECRET or ENDPOINT_BROKER_JWT_PUBLIC_KEY_FILE is set; "
                "tokens are checked against a random secret that dies with this process")
    print(
        f"\nDev mode. A token for user {DEV_USER!r} in organisation {DEV_ORG!r}, valid 24 h:\n\n"
        f"DEV_TOKEN={token}\n\n"
        "Register an endpoint with:\n\n"
        f"  curl -s -X POST {base}/rtc-api/users/endpoints -H 'Authorization: Bearer {token}' "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}\n",
        flush=True,
    )


class Server(uvicorn.Server):
    """uvicorn's server, except that a SIGTERM/SIGINT it handled ends the process with status 0.

    uvicorn re-raises the signal after shutting down, which makes a clean stop
    look like a crash (status -15, or a KeyboardInterrupt traceback).
    """

    on_exit: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self.on_exit is not None:
            self.on_exit()
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

    # Called as a drain starts: the MQTT listeners stop accepting too, not only uvicorn's.
    stop_accepting: Callable[[], None] | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # The drain's first step: stop accepting on every listener, before uvicorn finishes the
        # HTTP requests in flight; the lifespan then closes the connections and the store.
        if self.stop_accepting is not None:
            self.stop_accepting()
        await super().shutdown(sockets)


def raise_file_limit() -> int | None:
    """Every MQTT connection holds a descriptor: use all the hard limit allows (often 1024 soft).

    Returns the open file limit, or None when there is none to respect."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    log.info("open file limit: %s (about that many connections)", soft)
    return None if soft == resource.RLIM_INFINITY else soft


def load_tls(settings: Settings) -> ServerTls | None:
    """The listeners' TLS contexts, or ConfigError naming the file that is missing, unreadable or wrong."""
    if not (settings.tls_cert and settings.tls_key):
        return None
    return ServerTls(TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca))


def reload_on_sighup(tls: ServerTls | None) -> None:
    """SIGHUP (systemctl reload) reloads the certificate; without TLS it must not kill the process either."""

    def reload() -> None:
        if tls is None:
            log.info("SIGHUP: TLS is off, nothing to reload")
        else:
            tls.reload()

    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reload)


def serve(settings: Settings, tls: ServerTls | None) -> int:
    log.info("settings: %s", settings.redacted())
    file_limit = raise_file_limit()
    app = build_app(settings, tls)
    max_connections = max_connections_for(settings.http_max_connections, file_limit)
    if max_connections < settings.http_max_connections:
        log.warning("http_max_connections lowered to %d: the open file limit %s keeps %d descriptors "
                    "for MQTT and /healthz", max_connections, file_limit, fd_reserve(file_limit or 0))

    def ssl_context(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        # uvicorn's supported hook for a context of our own: the one SIGHUP reloads in place.
        assert tls is not None
        return tls.http

    server = Server(uvicorn.Config(
        app,
        host=settings.host,
        port=settings.http_port,
        lifespan="on",
        log_config=None,
        access_log=settings.http_access_log,
        # SIGTERM: stop accepting (Server.shutdown), finish the HTTP requests in flight within this
        # bound, then the lifespan closes the MQTT connections and commits the journal (http_bridge.app).
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout_seconds)),
        # A WebSocket message carries MQTT packets: cap it like a TCP packet, not at uvicorn's 16 MiB.
        ws_max_size=settings.mqtt_max_packet_bytes + 1024,
        # No WebSocket pings: MQTT has its own keep-alive, and some MQTT clients (paho) answer
        # a ping with an unmasked frame, which the server must then treat as a protocol error.
        ws_ping_interval=None,
        ssl_context_factory=None if tls is None else ssl_context,
        # A request deadline and a connection cap: slow or idle sockets cannot hold descriptors forever.
        http=guarded_protocol(request_timeout_seconds=settings.http_request_timeout_seconds,
                              max_connections=max_connections),
    ))
    server.stop_accepting = app.state.mqtt.stop_accepting

    async def main() -> None:
        reload_on_sighup(tls)
        loop = asyncio.get_running_loop()
        # Dashboard streams never end by themselves: end them at once, or they hold the drain to its bound.
        def end_streams() -> None:
            loop.call_soon_threadsafe(app.state.dashboard.shutdown)

        server.on_exit = end_streams
        await server.serve()

    run_event_loop(main())
    return 0 if server.started else 1


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it is installed (uvicorn[standard] brings it): faster sockets and timers."""
    try:
        import uvloop  # noqa: PLC0415 - optional: not on every platform
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def mint(settings: Settings, args: argparse.Namespace) -> int:
    roles = args.role or ["ROLE_USER"]
    if not args.org and not set(roles) & set(settings.jwt_service_roles):
        print("token: --org is required: a user token without an organisation is always refused "
              "(only SERVICE tokens may omit it)", file=sys.stderr)
        return 2
    if not settings.jwt_secret:
        print("token: no HS256 secret is configured (ENDPOINT_BROKER_JWT_SECRET or jwt_secret in --config).\n"
              "In dev mode the service makes a new secret at every start and prints a token itself.",
              file=sys.stderr)
        return 2
    print(mint_token(settings.jwt_secret, user_id=args.user, organization_id=args.org, roles=roles,
                     ttl_seconds=args.ttl, claims=claim_names(settings), issuer=settings.jwt_issuer,
                     audience=settings.jwt_audience))
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="run_broker.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", help="address to bind (ENDPOINT_BROKER_HOST, default 127.0.0.1)")
    parser.add_argument("--mqtt-port", type=int, help="MQTT over TCP (ENDPOINT_BROKER_MQTT_PORT, default 1883)")
    parser.add_argument("--http-port", type=int,
                        help="HTTP bridge and MQTT over WebSocket at /ws (ENDPOINT_BROKER_HTTP_PORT, default 8080)")
    parser.add_argument("--config", metavar="FILE", help="YAML settings (ENDPOINT_BROKER_CONFIG)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING... (ENDPOINT_BROKER_LOG_LEVEL, default INFO)")
    parser.add_argument("--log-format", choices=("text", "json"),
                        help="text, or json: one object per line (ENDPOINT_BROKER_LOG_FORMAT, default text)")
    parser.add_argument("--metrics-port", type=int,
                        help="serve GET /metrics on this port only, not on the HTTP port "
                             "(ENDPOINT_BROKER_METRICS_PORT, default 0: on the HTTP port)")
    metrics = parser.add_mutually_exclusive_group()
    metrics.add_argument("--metrics-enabled", dest="metrics_enabled", action="store_const", const=True,
                         help="serve GET /metrics and count for it (ENDPOINT_BROKER_METRICS_ENABLED, default true)")
    metrics.add_argument("--no-metrics", dest="metrics_enabled", action="store_const", const=False,
                         help="no GET /metrics and no per-request metrics work; request ids stay")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="where the store keeps its file (ENDPOINT_BROKER_DATA_DIR, default data)")
    parser.add_argument("--store", choices=("sqlite", "memory"),
                        help="sqlite (durable, the default) or memory (ENDPOINT_BROKER_STORE)")
    parser.add_argument("--tls-cert", metavar="FILE",
                        help="PEM certificate chain; with --tls-key turns on HTTPS, wss:// and MQTT over TLS "
                             "(ENDPOINT_BROKER_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert (ENDPOINT_BROKER_TLS_KEY)")
    parser.add_argument("--mqtts-port", type=int, help="MQTT over TLS (ENDPOINT_BROKER_MQTTS_PORT, default 8883)")
    parser.add_argument("--tls-client-ca", metavar="FILE",
                        help="PEM CA certificates; MQTT over TLS then requires a client certificate they signed "
                             "(ENDPOINT_BROKER_TLS_CLIENT_CA)")
    parser.add_argument("--redis-url", metavar="URL",
                        help="redis://HOST:PORT/DB: run as a node of the cluster that this Redis database "
                             "defines (ENDPOINT_BROKER_REDIS_URL)")
    parser.add_argument("--node-id", help="this node's name in the cluster (ENDPOINT_BROKER_NODE_ID, "
                                          "default <hostname>-<pid>)")
    commands = parser.add_subparsers(dest="command")
    token = commands.add_parser("token", help="mint a token with the configured HS256 secret")
    token.add_argument("--user", required=True, help="the userId claim")
    token.add_argument("--org", help="the organization_id claim")
    token.add_argument("--role", action="append", help="a role in authorities, e.g. SERVICE (repeatable)")
    token.add_argument("--ttl", type=float, default=3600.0, metavar="SECONDS", help="lifetime (default 3600)")
    token.add_argument("--config", dest="token_config", metavar="FILE", help="YAML settings")
    commands.add_parser("genconfig", help="print a YAML file of every setting with its default")
    return parser.parse_args(argv)


def example_config() -> str:
    """config/example.yaml: every setting, its default and what it means."""
    return resources.files("config").joinpath("example.yaml").read_text()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "genconfig":
        print(example_config(), end="")
        return 0
    overrides = {"host": args.host, "mqtt_port": args.mqtt_port, "http_port": args.http_port,
                 "log_level": args.log_level, "mqtts_port": args.mqtts_port, "tls_cert": args.tls_cert,
                 "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca, "data_dir": args.data_dir,
                 "store": args.store, "log_format": args.log_format, "metrics_port": args.metrics_port,
                 "metrics_enabled": args.metrics_enabled, "redis_url": args.redis_url, "node_id": args.node_id}
    try:
        settings = load_settings(os.environ, getattr(args, "token_config", None) or args.config, overrides)
        if args.command == "token":
            return mint(settings, args)
        tls = load_tls(settings)
        configure_logging(settings.log_level, settings.log_format)
        return serve(settings, tls)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
