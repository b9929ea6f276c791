"""The process as an operator runs it: expiry, shutdown, dev mode, token minting and configuration."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import ROOT, SECRET, RawMqtt, ServiceProcess, free_port, token, wait_until

BASE = "/rtc-api/users/endpoints"


def test_rest_endpoint_goes_healthy_sick_then_gone(service: ServiceProcess, unique: str) -> None:
    """The flow over HTTP; when each state comes is a table rule, tested on a fake clock (test_table.py)."""
    bearer = token(f"u-{unique}")
    endpoint_id = service.register(bearer, keep_alive=1)

    def state() -> str:
        response = service.view(bearer, endpoint_id)
        return str(response.json()["state"]) if response.status_code == 200 else "GONE"

    assert state() == "HEALTHY"
    # SICK lasts a whole second (the minimum grace): polled every 50 ms, it cannot be missed.
    wait_until(lambda: state() == "SICK", timeout=10, interval=0.02)
    wait_until(lambda: state() == "GONE", timeout=10)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown(make_service: Callable[..., ServiceProcess], sig: int) -> None:
    process = make_service()
    bearer = token("shutdown-user")
    process.register(bearer)
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect("shutdown-ep", "shutdown-user", bearer) == (0, False)
        assert process.stop(sig) == 0
        client.wait_closed(timeout=5)
    log = process.stderr()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
    for port in (process.mqtt_port, process.http_port):
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass


def test_dev_mode_prints_a_working_token_and_curl_line(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(secret=None)
    output = wait_until(lambda: "DEV_TOKEN=" in process.stdout() and process.stdout())
    dev_token = re.search(r"DEV_TOKEN=(\S+)", output).group(1)  # type: ignore[union-attr]
    assert "curl" in output and f"127.0.0.1:{process.http_port}/rtc-api/users/endpoints" in output
    assert "DEV MODE" in process.stderr()
    with process.http(dev_token) as http:
        response = http.post(BASE, json={"keepAliveSeconds": 60})
        assert response.status_code == 200
        assert http.get(BASE).json()[0]["userId"] == "dev-user"
    # The secret is random per process: a token for the test secret is refused.
    with process.http(token("dev-user", "dev-org")) as http:
        assert http.get(BASE).status_code == 401


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ENDPOINT_BROKER_")}
    # A data dir of its own: a command that gets as far as opening the store must not write in the repository.
    clean["ENDPOINT_BROKER_DATA_DIR"] = tempfile.mkdtemp(prefix="endpoint-broker-cli-")
    return subprocess.run([sys.executable, str(ROOT / "run_broker.py"), *args], cwd=ROOT,
                          env={**clean, **(env or {})}, capture_output=True, text=True, timeout=30, check=False)


def test_token_command_mints_a_token_the_service_accepts(service: ServiceProcess) -> None:
    result = run_cli("token", "--user", "minted", "--org", "mint-org", "--role", "SERVICE", "--ttl", "120",
                     env={"ENDPOINT_BROKER_JWT_SECRET": SECRET})
    assert result.returncode == 0, result.stderr
    minted = result.stdout.strip()
    with service.http(minted) as http:
        response = http.get(BASE, params={"organizationId": "someone-else"})  # only a SERVICE may filter so
    assert response.status_code == 200


def test_token_command_without_a_secret_explains_itself() -> None:
    result = run_cli("token", "--user", "u", "--org", "o")
    assert result.returncode == 2
    assert "ENDPOINT_BROKER_JWT_SECRET" in result.stderr


def test_settings_precedence_yaml_then_environment_then_flags(
    make_service: Callable[..., ServiceProcess], tmp_path: Path
) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(f"jwt_secret: {SECRET}\nmax_keep_alive_seconds: 100\nmax-body-bytes: 1000\n"
                      "http_port: 1\n")
    process = ServiceProcess(env={"ENDPOINT_BROKER_MAX_BODY_BYTES": "2000"}, secret=None,
                             args=["--config", str(config)])
    process.start()  # --http-port from the flags beats http_port: 1 from the file
    try:
        with process.http(token("cfg")) as http:
            too_long = http.post(BASE, json={"keepAliveSeconds": 101})
            assert too_long.status_code == 400 and "100" in too_long.json()["detail"]
            assert http.post(BASE, json={"keepAliveSeconds": 100, "pad": "x" * 1500}).status_code == 200
            assert http.post(BASE, json={"keepAliveSeconds": 100, "pad": "x" * 2500}).status_code == 413
    finally:
        process.close()


@pytest.mark.parametrize(("content", "message"), [
    ("no_such_setting: 1\n", "unknown setting"),
    ("mqtt_port: lots\n", "mqtt_port"),
    ("- a list\n", "mapping"),
    ("jwt_algorithms: [none]\n", "none"),
])
def test_bad_configuration_exits_2_with_a_clear_message(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(content)
    result = run_cli("--config", str(config), "--http-port", str(free_port()), "--mqtt-port", str(free_port()))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_binds_to_loopback_by_default() -> None:
    from config import load_settings

    assert load_settings({}).host == "127.0.0.1"


def test_public_key_file_selects_rs256(make_service: Callable[..., ServiceProcess], tmp_path: Path) -> None:
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    process = make_service(secret=None, env={"ENDPOINT_BROKER_JWT_PUBLIC_KEY_FILE": str(key_file)})
    claims = {"userId": "rsa-user", "organization_id": "o", "exp": int(time.time()) + 60}
    with process.http(jwt.encode(claims, private, algorithm="RS256")) as http:
        assert http.get(BASE).status_code == 200
    with process.http(token("hs-user")) as http:  # HS256 is not configured
        assert http.get(BASE).status_code == 401
    assert "DEV MODE" not in process.stderr()


def test_a_busy_port_fails_startup_with_a_non_zero_exit() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        busy = blocker.getsockname()[1]
        result = run_cli("--mqtt-port", str(busy), "--http-port", str(free_port()),
                         env={"ENDPOINT_BROKER_JWT_SECRET": SECRET})
    assert result.returncode != 0



def test_cors_is_off_by_default_and_configurable(service: ServiceProcess,
                                                make_service: Callable[..., ServiceProcess]) -> None:
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with service.http() as http:
        assert "access-control-allow-origin" not in http.options(BASE, headers=preflight).headers
    process = make_service(env={"ENDPOINT_BROKER_CORS_ALLOW_ORIGINS": "https://app.example"})
    with process.http(token("cors")) as http:
        allowed = http.options(BASE, headers=preflight)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://app.example"
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        response = http.get(BASE, headers={"Origin": "https://app.example"})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        denied = http.options(BASE, headers={**preflight, "Origin": "https://evil.example"})
        assert denied.status_code == 400


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="needs Linux /proc")
def test_the_open_file_limit_is_raised_to_the_hard_limit(make_service: Callable[..., ServiceProcess]) -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard limit above 256")
    process = make_service(soft_file_limit=256)
    assert process.process is not None
    limits = Path(f"/proc/{process.process.pid}/limits").read_text()
    soft, hard_seen = next(line for line in limits.splitlines() if line.startswith("Max open files")).split()[3:5]
    assert int(soft) == int(hard_seen) == hard
    wait_until(lambda: f"open file limit: {hard}" in process.stderr())  # INFO lines are flushed within 0.25 s


def test_endpoints_per_user_are_capped(make_service: Callable[..., ServiceProcess]) -> None:
    process = make_service(env={"ENDPOINT_BROKER_MAX_ENDPOINTS_PER_USER": "2"})
    bearer = token("greedy")
    first = process.register(bearer, endpoint_id="g1")
    process.register(bearer, endpoint_id="g2")
    with process.http(bearer) as http:
        refused = http.post(BASE, json={"keepAliveSeconds": 60, "userEndpointId": "g3"})
        assert refused.status_code == 409 and refused.json()["field"] == "userEndpointId"
        assert http.post(BASE, json={"keepAliveSeconds": 90, "userEndpointId": first}).status_code == 200
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect("g4", "greedy", bearer) == (5, False)
    with RawMqtt(process.mqtt_port) as client:
        assert client.connect(first, "greedy", bearer) == (0, False)  # attaching is not registering
    assert process.register(token("modest"), endpoint_id="m1") == "m1"  # other users are not affected


def test_settings_are_logged_without_the_secret(service: ServiceProcess) -> None:
    log = wait_until(lambda: "settings: " in service.stderr() and service.stderr())
    assert "'jwt_secret': '***'" in log
    assert SECRET not in log


def test_token_command_needs_an_organisation_for_user_tokens() -> None:
    refused = run_cli("token", "--user", "u", env={"ENDPOINT_BROKER_JWT_SECRET": SECRET})
    assert refused.returncode == 2 and "--org" in refused.stderr
    service = run_cli("token", "--user", "backend", "--role", "ROLE_SERVICE",
                      env={"ENDPOINT_BROKER_JWT_SECRET": SECRET})
    assert service.returncode == 0 and service.stdout.count(".") == 2
