"""TLS: HTTPS, wss:// and MQTT over TLS on one certificate, checked at startup and reloaded on SIGHUP."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import run_broker
from config import ConfigError, load_settings
from config.tls import ServerTls, TlsFiles
from tests.certificates import (
    CertificateAuthority,
    handshake_certificate,
    peer_certificate,
    tls11_handshake_error,
)
from tests.support import (
    CONNECT,
    ROOT,
    ServiceProcess,
    event,
    listening_ports,
    packet,
    paho_client,
    service_token,
    token,
    wait_until,
)

# ------------------------------------------------------------------ unit: files and reload


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def pair(ca: CertificateAuthority, directory: Path, name: str = "one") -> TlsFiles:
    cert, key = ca.issue(name).write(directory / "cert.pem", directory / "key.pem")
    return TlsFiles(str(cert), str(key))


def test_contexts_refuse_anything_older_than_tls_1_2(ca: CertificateAuthority, tmp_path: Path) -> None:
    tls = ServerTls(pair(ca, tmp_path))
    assert tls.http.minimum_version == ssl.TLSVersion.TLSv1_2
    assert tls.mqtt is tls.http


def test_a_missing_or_unreadable_file_is_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = pair(ca, tmp_path)
    with pytest.raises(ConfigError, match=r"tls_cert .*nowhere\.pem: No such file"):
        ServerTls(TlsFiles(str(tmp_path / "nowhere.pem"), files.key))
    with pytest.raises(ConfigError, match=rf"tls_key {tmp_path}: Is a directory"):
        ServerTls(TlsFiles(files.cert, str(tmp_path)))


def test_a_file_without_pem_content_is_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = pair(ca, tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM\n")
    with pytest.raises(ConfigError, match=r"tls_cert .*garbage\.pem: no PEM certificate"):
        ServerTls(TlsFiles(str(garbage), files.key))
    with pytest.raises(ConfigError, match=r"tls_key .*garbage\.pem: no usable PEM private key"):
        ServerTls(TlsFiles(files.cert, str(garbage)))


def test_a_key_of_another_certificate_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = pair(ca, tmp_path)
    other = tmp_path / "other.key"
    other.write_bytes(ca.issue("other").key_pem)
    with pytest.raises(ConfigError, match=r"tls_key .*other\.key does not match the certificate in tls_cert"):
        ServerTls(TlsFiles(files.cert, str(other)))


def test_an_encrypted_key_is_refused_without_prompting(ca: CertificateAuthority, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    files = pair(ca, tmp_path)
    key = serialization.load_pem_private_key(Path(files.key).read_bytes(), None)
    Path(files.key).write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match=r"tls_key .* encrypted"):
        ServerTls(files)


def test_reload_swaps_the_pair_in_place_and_a_failed_one_keeps_it(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = pair(ca, tmp_path, "one")
    tls = ServerTls(files)
    two = ca.issue("two")
    two.write(Path(files.cert), Path(files.key))
    assert tls.reload()
    assert handshake_certificate(tls.http, ca.client_context()) == two.der
    # A new certificate whose key has not been written yet: the reload fails, the live pair stays whole.
    Path(files.cert).write_bytes(ca.issue("three").cert_pem)
    assert not tls.reload()
    assert handshake_certificate(tls.http, ca.client_context()) == two.der


def test_a_client_ca_is_required_on_mqtt_only(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = pair(ca, tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    tls = ServerTls(TlsFiles(files.cert, files.key, str(tmp_path / "ca.pem")))
    assert tls.mqtt.verify_mode == ssl.CERT_REQUIRED
    assert tls.http.verify_mode == ssl.CERT_NONE
    with pytest.raises(ConfigError, match=r"tls_client_ca .*missing\.pem"):
        ServerTls(TlsFiles(files.cert, files.key, str(tmp_path / "missing.pem")))


@pytest.mark.parametrize(("environ", "message"), [
    ({"ENDPOINT_BROKER_TLS_CERT": "c.pem"}, "tls_cert is set but tls_key is not"),
    ({"ENDPOINT_BROKER_TLS_KEY": "k.pem"}, "tls_key is set but tls_cert is not"),
    ({"ENDPOINT_BROKER_TLS_CLIENT_CA": "ca.pem"}, "tls_client_ca needs tls_cert and tls_key"),
    ({"ENDPOINT_BROKER_MQTTS_PORT": "0"}, "mqtts_port"),
    ({"ENDPOINT_BROKER_TLS_CERT": "c.pem", "ENDPOINT_BROKER_TLS_KEY": "k.pem", "ENDPOINT_BROKER_MQTTS_PORT": "1883"},
     "mqtts_port 1883 is already mqtt_port or http_port"),
])
def test_tls_settings_that_cannot_work_are_refused(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(environ)


def test_a_certificate_without_its_key_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_broker.main(["--tls-cert", "cert.pem"]) == 2
    assert "tls_cert is set but tls_key is not" in capsys.readouterr().err


# ------------------------------------------------------------------ the process


@pytest.fixture
def tls_service(ca: CertificateAuthority, tmp_path: Path,
                make_service: Callable[..., ServiceProcess]) -> Callable[..., ServiceProcess]:
    """A service with TLS on a certificate "one" in tmp_path, plain MQTT off as production runs it."""

    def start(*args: str) -> ServiceProcess:
        files = pair(ca, tmp_path, "one")
        return make_service(tls=ca.client_context(),
                            args=["--tls-cert", files.cert, "--tls-key", files.key, "--mqtt-port", "0", *args])

    return start


def test_mqtts_and_wss_receive_an_event_sent_over_https(
        tls_service: Callable[..., ServiceProcess], ca: CertificateAuthority, unique: str) -> None:
    service = tls_service()
    assert service.process is not None
    assert listening_ports(service.process.pid) == {service.http_port, service.mqtts_port}
    user, bearer = f"u-{unique}", token(f"u-{unique}")
    with paho_client(service, f"tls-{unique}", user, bearer, tls=ca.client_context()) as mqtts, \
            paho_client(service, f"wss-{unique}", user, bearer, websocket=True, tls=ca.client_context()) as wss:
        for client, endpoint in ((mqtts, f"tls-{unique}"), (wss, f"wss-{unique}")):
            assert client.connect() == 0
            assert client.subscribe(f"users/endpoints/{endpoint}") == [1]
        response = service.send_event(service_token(), {"userId": user, "organizationId": "org-a", "qos": 1,
                                                        "event": event(callId=unique)})
        assert response.json() == 2
        assert service.base_url.startswith("https://")
        for client in (mqtts, wss):
            assert json.loads(client.next_message().payload) == event(callId=unique)


def test_tls_1_1_is_refused(tls_service: Callable[..., ServiceProcess]) -> None:
    service = tls_service()
    for port in (service.mqtts_port, service.http_port):
        # uvloop's TLS may close without sending the protocol_version alert: either is a refusal.
        assert tls11_handshake_error(port) in ("TLSV1_ALERT_PROTOCOL_VERSION", "UNEXPECTED_EOF_WHILE_READING")


def test_sighup_serves_a_new_certificate_to_new_connections_only(
        tls_service: Callable[..., ServiceProcess], ca: CertificateAuthority, tmp_path: Path, unique: str) -> None:
    service = tls_service()
    assert service.process is not None
    user, bearer = f"u-{unique}", token(f"u-{unique}")
    with paho_client(service, f"old-{unique}", user, bearer, tls=ca.client_context()) as old:
        assert old.connect() == 0
        assert old.subscribe(f"users/endpoints/old-{unique}") == [1]
        two = ca.issue("two")
        two.write(tmp_path / "cert.pem", tmp_path / "key.pem")
        service.process.send_signal(signal.SIGHUP)
        for port in (service.mqtts_port, service.http_port):
            wait_until(lambda port=port: peer_certificate(port, ca.client_context()) == two.der, timeout=10)
        response = service.send_event(bearer, {"userId": user, "qos": 1, "event": event(callId=unique)})
        assert response.json() == 1
        assert unique in old.next_message().payload.decode()

        # A half-written renewal (a key that is not the certificate's) is refused and the old pair stays.
        (tmp_path / "key.pem").write_bytes(ca.issue("three").key_pem)
        service.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "TLS reload failed" in service.stderr(), timeout=10)
        assert "does not match" in service.stderr()
        for port in (service.mqtts_port, service.http_port):
            assert peer_certificate(port, ca.client_context()) == two.der
    assert service.process.poll() is None


def test_a_client_ca_makes_mqtts_require_a_client_certificate(
        tls_service: Callable[..., ServiceProcess], ca: CertificateAuthority, tmp_path: Path, unique: str) -> None:
    (tmp_path / "client-ca.pem").write_bytes(ca.pem)
    service = tls_service("--tls-client-ca", str(tmp_path / "client-ca.pem"))
    assert service.health()["status"] == "ok"  # HTTPS asks browsers for no certificate
    user, bearer = f"u-{unique}", token(f"u-{unique}")
    with_certificate = ca.client_context(ca.issue("device", client=True), tmp_path)
    with paho_client(service, f"dev-{unique}", user, bearer, tls=with_certificate) as client:
        assert client.connect() == 0
    assert first_mqtt_reply(service.mqtts_port, with_certificate)[:1] == b"\x20"  # a CONNACK
    assert first_mqtt_reply(service.mqtts_port, ca.client_context()) == b"refused"


def first_mqtt_reply(port: int, context: ssl.SSLContext) -> bytes:
    """Send a CONNECT over TLS; return the first bytes answered, or b"refused" if the TLS layer refused."""
    connect = packet(CONNECT << 4, b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x01x")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            # TLS 1.3 completes the client's side of the handshake first: a refusal shows on the first read.
            tls.sendall(connect)
            return tls.recv(16) or b"refused"
    except (ssl.SSLError, ConnectionResetError):
        return b"refused"


def test_a_bad_key_file_stops_startup_with_status_2(ca: CertificateAuthority, tmp_path: Path) -> None:
    files = pair(ca, tmp_path)
    Path(files.key).write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_broker.py"), "--tls-cert", files.cert, "--tls-key", files.key,
         "--mqtt-port", "0", "--http-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2, result.stderr
    assert f"tls_key {files.key}" in result.stderr


def test_sighup_without_tls_leaves_the_service_running(make_service: Callable[..., ServiceProcess]) -> None:
    # systemctl reload sends SIGHUP whatever the settings; its default action would end the process.
    service = make_service()
    assert service.process is not None
    service.process.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS is off, nothing to reload" in service.stderr())
    assert service.process.poll() is None
    assert service.health()["status"] == "ok"
