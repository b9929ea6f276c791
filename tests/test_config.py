"""Settings: precedence and the one place each default lives (unit tests)."""

from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, Settings, load_settings
from endpoint_core.logtext import without_password
from endpoint_core.table import TablePolicy


def test_the_table_policy_defaults_are_the_tables_own() -> None:
    assert Settings().table_policy() == TablePolicy()


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("queue-max-events: 5\nack_timeout_seconds: 3\nhttp_port: 1\nclient_publish_allow: [a/+]\n")
    settings = load_settings(
        {"ENDPOINT_BROKER_CONFIG": str(config), "ENDPOINT_BROKER_ACK_TIMEOUT_SECONDS": "4",
         "ENDPOINT_BROKER_HTTP_PORT": "2", "ENDPOINT_BROKER_CORS_ALLOW_ORIGINS": "https://a, https://b"},
        overrides={"http_port": 3, "host": None},
    )
    assert (settings.queue_max_events, settings.ack_timeout_seconds, settings.http_port) == (5, 4.0, 3)
    assert settings.client_publish_allow == ["a/+"]
    assert settings.cors_allow_origins == ["https://a", "https://b"]
    assert settings.host == "127.0.0.1"
    assert settings.table_policy().queue_max_events == 5


@pytest.mark.parametrize(("environ", "message"), [
    ({"ENDPOINT_BROKER_MQTT_PORT": "70000"}, "mqtt_port"),
    ({"ENDPOINT_BROKER_HTTP_ACCESS_LOG": "maybe"}, "true or false"),
    ({"ENDPOINT_BROKER_QUEUE_MAX_EVENTS": "0"}, "queue_max_events"),
    ({"ENDPOINT_BROKER_JWT_PUBLIC_KEY_FILE": "/nonexistent.pem"}, "does not exist"),
    ({"ENDPOINT_BROKER_REMINDER_RATIO": "1.5"}, "reminder_ratio"),
    ({"ENDPOINT_BROKER_ACK_TIMEOUT_SECONDS": "0"}, "ack_timeout_seconds"),
    ({"ENDPOINT_BROKER_QUEUE_MAX_EVENTS": "40000"}, "queue_max_events"),
    ({"ENDPOINT_BROKER_LOG_LEVEL": "verbose"}, "log_level"),
    ({"ENDPOINT_BROKER_LOG_FORMAT": "xml"}, "log_format"),
    ({"ENDPOINT_BROKER_METRICS_PORT": "70000"}, "metrics_port"),
    ({"ENDPOINT_BROKER_METRICS_PORT": "8080"}, "metrics_port"),  # the HTTP port's
    ({"ENDPOINT_BROKER_METRICS_ENABLED": "sometimes"}, "metrics_enabled"),
    # A port for metrics that are off: refused rather than silently ignored.
    ({"ENDPOINT_BROKER_METRICS_ENABLED": "false", "ENDPOINT_BROKER_METRICS_PORT": "9100"}, "metrics_enabled"),
    ({"ENDPOINT_BROKER_MAX_ENDPOINTS_PER_USER": "0"}, "max_endpoints_per_user"),
    ({"ENDPOINT_BROKER_DEFAULT_MQTT_KEEP_ALIVE_SECONDS": "0"}, "default_mqtt_keep_alive_seconds"),
    ({"ENDPOINT_BROKER_ENDPOINT_ID_PATTERN": "[a-"}, "endpoint_id_pattern"),
])
def test_malformed_settings_are_refused_with_their_name(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)




def test_metrics_are_on_by_default_and_turned_off_from_yaml_environment_or_flag(tmp_path: Path) -> None:
    import run_broker

    assert Settings().metrics_enabled is True
    config = tmp_path / "c.yaml"
    config.write_text("metrics_enabled: false\n")
    assert load_settings({}, str(config)).metrics_enabled is False
    assert load_settings({"ENDPOINT_BROKER_METRICS_ENABLED": "false"}).metrics_enabled is False
    assert load_settings({"ENDPOINT_BROKER_METRICS_ENABLED": "false"},
                         overrides={"metrics_enabled": True}).metrics_enabled is True
    assert run_broker.parse_args(["--no-metrics"]).metrics_enabled is False
    assert run_broker.parse_args(["--metrics-enabled"]).metrics_enabled is True
    assert run_broker.parse_args([]).metrics_enabled is None  # no flag: the file and environment decide


def test_the_webhook_policy_defaults_are_its_own_and_the_secret_is_redacted() -> None:
    from endpoint_core.webhook import WebhookPolicy

    assert Settings().webhook_policy() == WebhookPolicy()
    settings = load_settings({"ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_URL": "https://hooks.example/endpoints",
                              "ENDPOINT_BROKER_LIFECYCLE_WEBHOOK_SECRET": "hush"})
    assert settings.redacted()["lifecycle_webhook_secret"] == "***"


@pytest.mark.parametrize(("environment", "named"), [
    ({"LIFECYCLE_WEBHOOK_URL": "ftp://hooks.example/x"}, "lifecycle_webhook_url"),
    ({"LIFECYCLE_WEBHOOK_SECRET": "hush"}, "lifecycle_webhook_secret"),
    ({"LIFECYCLE_MQTT_QUEUE_MAX_EVENTS": "5001"}, "lifecycle_mqtt_queue_max_events"),
    ({"LIFECYCLE_WEBHOOK_QUEUE_MAX_EVENTS": "0"}, "lifecycle_webhook_queue_max_events"),
    ({"LIFECYCLE_WEBHOOK_RETRY_INITIAL_SECONDS": "0"}, "lifecycle_webhook_retry_initial_seconds"),
    ({"LIFECYCLE_WEBHOOK_RETRY_MAX_SECONDS": "0.5"}, "lifecycle_webhook_retry_max_seconds"),
    ({"DASHBOARD_MAX_STREAMS": "0"}, "dashboard_max_streams"),
])
def test_lifecycle_settings_that_cannot_work_are_refused(environment: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings({f"ENDPOINT_BROKER_{k}": v for k, v in environment.items()})


def test_the_redis_password_is_redacted_and_cluster_settings_are_checked() -> None:
    assert without_password("redis://:hunter2@db:6379/0") == "redis://:***@db:6379/0"
    assert without_password("rediss://app:hunter2@db/1") == "rediss://app:***@db/1"
    assert without_password("redis://db:6379/0") == "redis://db:6379/0"
    secured = {"jwt_secret": "x" * 40}
    settings = load_settings({}, None, {**secured, "redis_url": "redis://:hunter2@db:6379/0"})
    assert "hunter2" not in str(settings.redacted())
    for overrides, complaint in (
        ({"redis_url": "http://db"}, "redis://"),
        ({"redis_url": "redis://db/0", "jwt_secret": None}, "dev mode"),
        ({"node_id": "n1"}, "redis_url is not"),
        ({"redis_url": "redis://db/0", "node_id": "a b"}, "node_id"),
    ):
        with pytest.raises(ConfigError, match=complaint):
            load_settings({}, None, {**secured, **overrides})
