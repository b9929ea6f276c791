"""Settings and where they come from.

Precedence, lowest first: the defaults below, the YAML file (`--config FILE` or
ENDPOINT_BROKER_CONFIG), the environment (ENDPOINT_BROKER_<FIELD NAME>), then
command-line flags. Every field can be set in YAML (by its name) and in the
environment; the flags are --host, --mqtt-port, --http-port, --mqtts-port,
--tls-cert, --tls-key, --tls-client-ca, --config, --log-level, --log-format
--metrics-port, --metrics-enabled/--no-metrics, --redis-url and --node-id.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from broker_plugin.connection import ConnectionLimits
from endpoint_core import feeds, webhook
from endpoint_core.idempotency import DEFAULT_WINDOW_SECONDS
from endpoint_core.logtext import without_password
from endpoint_core.principals import ClaimNames
from endpoint_core.ratelimit import RateLimitPolicy
from endpoint_core.table import TablePolicy
from http_bridge.dashboard import DashboardPolicy

ENV_PREFIX = "ENDPOINT_BROKER_"
# Each default below that belongs to a component is that component's own.
_POLICY = TablePolicy()
_LIMITS = ConnectionLimits()
_CLAIMS = ClaimNames()
_RATES = RateLimitPolicy()
_WEBHOOK = webhook.WebhookPolicy()
_DASHBOARD = DashboardPolicy()


class ConfigError(ValueError):
    """A setting is missing, unknown or malformed; the message says which."""


@dataclass(frozen=True)
class Settings:
    # Where to listen. Loopback by default: exposing the service is a deliberate choice.
    host: str = "127.0.0.1"
    mqtt_port: int = 1883  # 0: no plain MQTT listener
    http_port: int = 8080
    mqtts_port: int = 8883
    log_level: str = "INFO"
    log_format: str = "text"  # or "json": one object per line
    # 0: GET /metrics on http_port. Else only on a listener of its own, on `host`, at this port.
    metrics_port: int = 0
    # false: no GET /metrics and none of the metrics-only work (per-request counts and timings, the
    # loop-lag sampler, lifecycle counts). Request ids stay: they belong to the logs.
    metrics_enabled: bool = True

    # Token verification. With neither a secret nor a public key, dev mode.
    jwt_secret: str | None = None
    jwt_public_key_file: str | None = None
    jwt_algorithms: list[str] | None = None  # default: HS256 and/or RS256/ES256, per key
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = 30.0
    jwt_user_claim: str = _CLAIMS.user
    jwt_user_fallback_claim: str = _CLAIMS.user_fallback
    jwt_organization_claim: str = _CLAIMS.organization
    jwt_roles_claim: str = _CLAIMS.roles
    jwt_service_roles: list[str] = field(default_factory=lambda: sorted(_CLAIMS.service_roles, reverse=True))

    # Endpoint lifecycle and delivery: the table's own defaults (endpoint_core.table.TablePolicy).
    max_keep_alive_seconds: int = _POLICY.max_keep_alive_seconds
    default_mqtt_keep_alive_seconds: int = _POLICY.default_mqtt_keep_alive_seconds
    expiry_grace_ratio: float = _POLICY.expiry_grace_ratio
    min_expiry_grace_seconds: float = _POLICY.min_expiry_grace_seconds
    reminder_ratio: float = _POLICY.reminder_ratio
    queue_max_events: int = _POLICY.queue_max_events
    queue_max_bytes: int = _POLICY.queue_max_bytes
    ack_timeout_seconds: float = _POLICY.ack_timeout_seconds
    max_endpoints_per_user: int = _POLICY.max_endpoints_per_user
    unregister_block_seconds: float = _POLICY.unregister_block_seconds
    endpoint_id_pattern: str | None = _POLICY.endpoint_id_pattern

    # Rate limits: the core's own defaults (endpoint_core.ratelimit.RateLimitPolicy). A rate of 0 is off.
    send_event_rate_per_second: float = _RATES.send_event_rate_per_second
    send_event_burst: int = _RATES.send_event_burst
    register_rate_per_second: float = _RATES.register_rate_per_second
    register_burst: int = _RATES.register_burst
    connect_rate_per_second: float = _RATES.connect_rate_per_second
    connect_burst: int = _RATES.connect_burst

    # TLS: with a certificate and its key, HTTPS (and wss://) on http_port and MQTT over TLS on mqtts_port.
    tls_cert: str | None = None
    tls_key: str | None = None
    # A CA whose client certificates MQTT over TLS then requires.
    tls_client_ca: str | None = None

    # Durability (README "Storage"): an embedded SQLite file in data_dir, or nothing kept (memory).
    data_dir: str = "data"
    store: str = "sqlite"
    store_synchronous: str = "full"
    store_max_bytes: int = 0  # 0: no bound but the disk's
    idempotency_window_seconds: float = DEFAULT_WINDOW_SECONDS
    # Cluster (README "Cluster"): with a Redis URL, this process is a node of the cluster that the Redis
    # database defines, and Redis holds the endpoint table instead of the embedded store.
    redis_url: str | None = None
    node_id: str | None = None  # default: <hostname>-<pid>
    # A node whose heartbeat Redis has not seen for this long is taken for dead: its endpoints are released.
    cluster_node_ttl_seconds: float = 5.0
    # SIGTERM/SIGINT: the drain (requests in flight, the journal, MQTT connections) takes at most this.
    shutdown_timeout_seconds: float = 10.0

    # HTTP.
    max_body_bytes: int = 64 * 1024
    # A request must arrive whole (headers and body) this long after the connection opens or the
    # previous response ends, else the connection is closed (slowloris, short bodies, idle sockets).
    http_request_timeout_seconds: float = 10.0
    # HTTP connections held at once, WebSockets at /ws included (lowered to fit the open file limit).
    http_max_connections: int = 10_000
    # One log line per request; off by default because it costs more than the request.
    http_access_log: bool = False
    # Browser origins allowed to call the REST API cross-origin ("*" for any). Empty: no CORS.
    cors_allow_origins: list[str] = field(default_factory=list)

    # MQTT.
    client_publish_allow: list[str] = field(default_factory=list)
    connect_timeout_seconds: float = _LIMITS.connect_timeout_seconds
    mqtt_max_packet_bytes: int = _LIMITS.max_packet_bytes
    mqtt_max_buffered_bytes: int = _LIMITS.max_buffered_bytes
    mqtt_max_connect_bytes: int = _LIMITS.max_connect_bytes
    # Connections allowed to await their CONNECT at once; more are refused at accept.
    mqtt_max_pending_connects: int = 1000

    # Lifecycle events (README, "Lifecycle events"): the MQTT feed, the webhook, the dashboard.
    lifecycle_mqtt_queue_max_events: int = feeds.DEFAULT_MAX_EVENTS
    lifecycle_webhook_url: str | None = None
    lifecycle_webhook_secret: str | None = None
    lifecycle_webhook_queue_max_events: int = _WEBHOOK.queue_max_events
    lifecycle_webhook_retry_initial_seconds: float = _WEBHOOK.retry_initial_seconds
    lifecycle_webhook_retry_max_seconds: float = _WEBHOOK.retry_max_seconds
    lifecycle_webhook_timeout_seconds: float = _WEBHOOK.timeout_seconds
    dashboard_max_streams: int = _DASHBOARD.max_streams
    dashboard_stream_queue_events: int = _DASHBOARD.stream_queue_events

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)

    @property
    def dev_mode(self) -> bool:
        return not self.jwt_secret and not self.jwt_public_key_file

    def check(self) -> None:
        for name in ("mqtt_port", "http_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"{name} must be a port number, got {port}")
        self._check_metrics()
        if self.log_format not in ("text", "json"):
            raise ConfigError(f"log_format must be text or json, got {self.log_format!r}")
        if not 1 <= self.mqtts_port <= 65535:
            raise ConfigError(f"mqtts_port must be a port number from 1, got {self.mqtts_port}")
        if bool(self.tls_cert) != bool(self.tls_key):
            given, missing = ("tls_cert", "tls_key") if self.tls_cert else ("tls_key", "tls_cert")
            raise ConfigError(f"{given} is set but {missing} is not: give both the certificate and its key, or neither")
        if self.tls and self.mqtts_port in (self.mqtt_port, self.http_port):
            raise ConfigError(f"mqtts_port {self.mqtts_port} is already mqtt_port or http_port: each needs its own")
        if self.tls_client_ca and not self.tls:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key: it applies to MQTT over TLS")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {self.log_level!r}")
        if self.jwt_algorithms is not None and any(a.lower() == "none" for a in self.jwt_algorithms):
            raise ConfigError("jwt_algorithms must never include 'none'")
        if not 1 <= self.default_mqtt_keep_alive_seconds <= self.max_keep_alive_seconds:
            raise ConfigError("default_mqtt_keep_alive_seconds must be from 1 to max_keep_alive_seconds")
        if not 0 < self.reminder_ratio < 1:
            raise ConfigError("reminder_ratio must be between 0 and 1")
        # Two topic forms per event, and QoS 1 packet ids are 16 bits: keep them from running out.
        if not 1 <= self.queue_max_events <= 30_000 or self.queue_max_bytes < 1:
            raise ConfigError("queue_max_events must be from 1 to 30000, and queue_max_bytes positive")
        if self.store not in ("sqlite", "memory"):
            raise ConfigError(f"store must be sqlite or memory, got {self.store!r}")
        if self.store_synchronous not in ("full", "normal"):
            raise ConfigError(f"store_synchronous must be full or normal, got {self.store_synchronous!r}")
        if self.store_max_bytes < 0:
            raise ConfigError("store_max_bytes must not be negative")
        for name in ("ack_timeout_seconds", "connect_timeout_seconds", "unregister_block_seconds",
                     "idempotency_window_seconds", "shutdown_timeout_seconds", "http_request_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        for name in ("expiry_grace_ratio", "min_expiry_grace_seconds", "jwt_leeway_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative")
        for name in ("send_event_rate_per_second", "register_rate_per_second", "connect_rate_per_second"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (0 turns the limit off)")
        for name in ("send_event_burst", "register_burst", "connect_burst",
                     "max_endpoints_per_user", "max_body_bytes", "http_max_connections",
                     "mqtt_max_packet_bytes", "mqtt_max_buffered_bytes", "mqtt_max_connect_bytes",
                     "mqtt_max_pending_connects"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if self.endpoint_id_pattern:
            try:
                re.compile(self.endpoint_id_pattern)
            except re.error as exc:
                raise ConfigError(f"endpoint_id_pattern is not a regular expression: {exc}") from None
        self._check_lifecycle()
        self._check_cluster()
        if self.jwt_public_key_file and not Path(self.jwt_public_key_file).is_file():
            raise ConfigError(f"jwt_public_key_file {self.jwt_public_key_file!r} does not exist")

    def _check_metrics(self) -> None:
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a port number, or 0 for the HTTP port, got {self.metrics_port}")
        if self.metrics_port and self.metrics_port in (self.mqtt_port, self.http_port):
            raise ConfigError(f"metrics_port {self.metrics_port} is already mqtt_port or http_port: give it its own")
        # Refused rather than ignored: a port that opens nothing would look like a scrape target that is down.
        if self.metrics_port and not self.metrics_enabled:
            raise ConfigError(f"metrics_port is {self.metrics_port} but metrics_enabled is false: there are no "
                              "metrics to serve; unset metrics_port or turn metrics on")

    def _check_cluster(self) -> None:
        if self.redis_url is None:
            if self.node_id is not None:
                raise ConfigError("node_id is set but redis_url is not: a node id names a node of a cluster")
            return
        if not re.match(r"rediss?://", self.redis_url):
            raise ConfigError("redis_url must be a redis:// (or rediss://) URL, e.g. redis://127.0.0.1:6379/0")
        if self.dev_mode:
            raise ConfigError("redis_url needs jwt_secret or jwt_public_key_file: every node must accept the "
                              "tokens of the others, and dev mode's secret is one process's own")
        if self.node_id is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", self.node_id):
            raise ConfigError("node_id must be 1 to 100 letters, digits, '.', '_' or '-'")
        if self.cluster_node_ttl_seconds < 2:
            raise ConfigError("cluster_node_ttl_seconds must be at least 2 (nodes send a heartbeat every second)")

    def _check_lifecycle(self) -> None:
        url = self.lifecycle_webhook_url
        if url and not re.match(r"https?://[^/\s]+", url):
            raise ConfigError("lifecycle_webhook_url must be an http:// or https:// URL")
        if self.lifecycle_webhook_secret and not url:
            raise ConfigError("lifecycle_webhook_secret is set but lifecycle_webhook_url is not")
        for name in ("lifecycle_mqtt_queue_max_events", "lifecycle_webhook_queue_max_events",
                     "dashboard_max_streams", "dashboard_stream_queue_events"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        # The feed's packet ids come from a range of 5535 (endpoint_core.outbox.LIFECYCLE_PACKET_IDS).
        if self.lifecycle_mqtt_queue_max_events > 5000:
            raise ConfigError("lifecycle_mqtt_queue_max_events must be at most 5000")
        for name in ("lifecycle_webhook_retry_initial_seconds", "lifecycle_webhook_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.lifecycle_webhook_retry_max_seconds < self.lifecycle_webhook_retry_initial_seconds:
            raise ConfigError("lifecycle_webhook_retry_max_seconds must be at least the initial retry delay")

    def webhook_policy(self) -> webhook.WebhookPolicy:
        return webhook.WebhookPolicy(
            queue_max_events=self.lifecycle_webhook_queue_max_events,
            retry_initial_seconds=self.lifecycle_webhook_retry_initial_seconds,
            retry_max_seconds=self.lifecycle_webhook_retry_max_seconds,
            timeout_seconds=self.lifecycle_webhook_timeout_seconds,
        )

    def table_policy(self) -> TablePolicy:
        """The table's settings, field by field."""
        return TablePolicy(**{f.name: getattr(self, f.name) for f in fields(TablePolicy)})

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            connect_timeout_seconds=self.connect_timeout_seconds,
            max_packet_bytes=self.mqtt_max_packet_bytes,
            max_connect_bytes=self.mqtt_max_connect_bytes,
            max_buffered_bytes=self.mqtt_max_buffered_bytes,
        )

    def rate_limit_policy(self) -> RateLimitPolicy:
        """The rate limits' settings, field by field."""
        return RateLimitPolicy(**{f.name: getattr(self, f.name) for f in fields(RateLimitPolicy)})

    def redacted(self) -> dict[str, Any]:
        """The settings, safe to log."""
        values = dataclasses.asdict(self)
        if values["jwt_secret"]:
            values["jwt_secret"] = "***"  # noqa: S105 - the redaction marker
        if values["lifecycle_webhook_secret"]:
            values["lifecycle_webhook_secret"] = "***"  # noqa: S105 - the redaction marker
        if values["redis_url"]:
            values["redis_url"] = without_password(values["redis_url"])
        return values


_HINTS = typing.get_type_hints(Settings)


def _field_type(name: str) -> type:
    """The concrete type of a field: `int | None` -> int, `list[str] | None` -> list."""
    hint = _HINTS[name]
    if isinstance(hint, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint)
    return origin if origin is not None else hint  # type: ignore[no-any-return]


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _field_type(name)
    if value is None:
        return None
    try:
        if kind is list:
            if isinstance(value, str):
                return [item.strip() for item in value.split(",") if item.strip()]
            if isinstance(value, list) and all(isinstance(item, str) for item in value):
                return value
            raise ValueError("expected a list of strings")
        if kind is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name}: {exc}") from None


def _from_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings")
    known = {f.name for f in fields(Settings)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"config file {path}: unknown setting {key!r}")
        values[name] = _coerce(name, value, path)
    return values


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for f in fields(Settings):
        variable = ENV_PREFIX + f.name.upper()
        if variable in environ and environ[variable] != "":
            values[f.name] = _coerce(f.name, environ[variable], variable)
    return values


def load_settings(
    environ: Mapping[str, str],
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Settings from defaults, YAML file, environment and flag `overrides`, in that order."""
    values: dict[str, Any] = {}
    config_file = config_file or environ.get(ENV_PREFIX + "CONFIG") or None
    if config_file:
        values.update(_from_yaml(config_file))
    values.update(_from_environment(environ))
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    settings = Settings(**values)
    settings.check()
    return settings
