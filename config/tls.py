"""TLS for every listener: one certificate and key, checked at startup, reloaded in place on SIGHUP.

The listeners hold on to the SSLContext objects built here. A reload loads the
new pair into those same objects, so every handshake after it uses the new
certificate while connections already established keep theirs.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from config.settings import ConfigError

log = logging.getLogger("endpoint_broker.tls")

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: str
    key: str
    client_ca: str | None = None  # when set, MQTT over TLS requires a client certificate signed by it


class _EncryptedKey(Exception):
    """The key needs a passphrase: refuse rather than let OpenSSL prompt on a terminal."""


def _no_passphrase() -> str:
    raise _EncryptedKey


def _readable(setting: str, path: str) -> None:
    try:
        with Path(path).open("rb") as file:
            file.read(1)
    except OSError as exc:
        raise ConfigError(f"{setting} {path}: {exc.strerror or exc}") from None


def _check_pair(files: TlsFiles) -> None:
    """Raise ConfigError naming the file at fault, or return when the pair loads."""
    _readable("tls_cert", files.cert)
    _readable("tls_key", files.key)
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        scratch.load_verify_locations(cafile=files.cert)
    except ssl.SSLError:
        raise ConfigError(f"tls_cert {files.cert}: no PEM certificate in it") from None
    try:
        scratch.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(f"tls_key {files.key}: the key is encrypted; give an unencrypted key") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"tls_key {files.key} does not match the certificate in tls_cert {files.cert}") from None
        raise ConfigError(f"tls_key {files.key}: no usable PEM private key in it ({exc.reason})") from None


def _server_context(files: TlsFiles) -> ssl.SSLContext:
    # The stdlib's server defaults (ciphers, options); only the minimum version is ours.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.load_cert_chain(files.cert, files.key, password=_no_passphrase)
    return context


def _client_verifying_context(files: TlsFiles, client_ca: str) -> ssl.SSLContext:
    _readable("tls_client_ca", client_ca)
    context = _server_context(files)
    try:
        context.load_verify_locations(cafile=client_ca)
    except ssl.SSLError:
        raise ConfigError(f"tls_client_ca {client_ca}: no PEM certificate in it") from None
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class ServerTls:
    """The contexts of the HTTPS and the MQTT-over-TLS listeners, and their reload."""

    def __init__(self, files: TlsFiles) -> None:
        _check_pair(files)
        self.files = files
        self.http = _server_context(files)
        # Browsers and the apps on wss:// have no client certificates: only MQTT over TLS may ask for one.
        self.mqtt = self.http if files.client_ca is None else _client_verifying_context(files, files.client_ca)

    def reload(self) -> bool:
        """Load the files again into the live contexts; on any error keep the old pair and log why."""
        try:
            # Checked on a scratch context first: a failed load_cert_chain can leave a context half-changed.
            _check_pair(self.files)
            for context in {id(c): c for c in (self.http, self.mqtt)}.values():
                context.load_cert_chain(self.files.cert, self.files.key, password=_no_passphrase)
        except (ConfigError, ssl.SSLError, OSError, _EncryptedKey) as exc:
            log.error("TLS reload failed, still serving the previous certificate: %s", exc)
            return False
        log.info("TLS certificate reloaded from %s and %s", self.files.cert, self.files.key)
        return True
