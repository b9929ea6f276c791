"""Log output: JSON lines, the request id carried end to end, masks, and no secret in any format."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading

import httpx
import pytest

from config import log_output
from config.log_output import BufferedStderrHandler, JsonFormatter, TextFormatter
from observability.context import request_id
from observability.requests import request_id_of
from tests.support import SECRET, RawMqtt, event, token, wait_until


def record(message: str, **extra: object) -> logging.LogRecord:
    entry = logging.LogRecord("endpoint_broker.test", logging.INFO, "", 0, message, None, None)
    entry.__dict__.update(extra)
    return entry


def test_json_lines_carry_the_fields_and_the_request_id() -> None:
    reset = request_id.set("rid-1")
    try:
        line = JsonFormatter().format(record("hello", endpoints=3))
    finally:
        request_id.reset(reset)
    entry = json.loads(line)
    assert entry["message"] == "hello"
    assert (entry["level"], entry["logger"], entry["request_id"], entry["endpoints"]) == \
        ("INFO", "endpoint_broker.test", "rid-1", 3)
    assert entry["timestamp"].endswith("Z")
    assert "request_id" not in json.loads(JsonFormatter().format(record("outside a request")))


def test_text_lines_name_the_request_id_inside_a_request() -> None:
    formatter = TextFormatter()
    reset = request_id.set("rid-2")
    try:
        assert formatter.format(record("hello")).endswith(" INFO endpoint_broker.test [rid-2]: hello")
    finally:
        request_id.reset(reset)
    assert formatter.format(record("hello")).endswith(" INFO endpoint_broker.test: hello")


def test_a_request_id_is_the_clients_when_safe_and_new_otherwise() -> None:
    assert request_id_of([(b"x-request-id", b"abc-123")]) == "abc-123"
    for unsafe in (b"", b"a b", b"x" * 129, b"\xff", b"a\x1b[31m"):
        fresh = request_id_of([(b"x-request-id", unsafe)])
        assert fresh != unsafe.decode("latin-1") and re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", fresh)
    assert request_id_of([]) != request_id_of([])


def test_json_logs_carry_the_request_id_end_to_end_with_masks_and_no_secret(make_service, unique: str) -> None:
    service = make_service(args=["--log-format", "json"])
    user = f"u-{unique}"
    bearer = token(user)
    password = f"pw-{unique}-hunter2"
    rid = f"send-{unique}"
    with RawMqtt(service.mqtt_port) as client:
        assert client.connect(f"e-{unique}", user, bearer)[0] == 0  # the token is the MQTT password
        client.subscribe(f"users/endpoints/e-{unique}")
        body = {"userId": user, "event": event(credentials={"password": password}),
                "masks": ["$.credentials.password"]}
        response = httpx.post(service.base_url + "/rtc-api/users/endpoints/sendEvent", json=body, timeout=10,
                              headers={"Authorization": f"Bearer {bearer}", "X-Request-Id": rid})
        assert response.json() == 1
        assert response.headers["x-request-id"] == rid
        client.next_publish()
    fresh = httpx.get(service.base_url + "/healthz", headers={"X-Request-Id": "no spaces allowed"}, timeout=10)
    assert re.fullmatch(r"[0-9a-f]{16}-[0-9a-f]+", fresh.headers["x-request-id"])
    refused = httpx.post(service.base_url + "/rtc-api/users/endpoints/keepalive", json={}, timeout=10,
                         headers={"Authorization": f"Bearer {token(user, secret='x' * 40)}"})
    assert refused.status_code == 401
    service.stop()  # flushes the log buffer

    lines = [json.loads(line) for line in service.stderr().splitlines() if line.strip()]
    assert all({"timestamp", "level", "logger", "message"} <= line.keys() for line in lines)
    caused = [line for line in lines if line.get("request_id") == rid]
    send_line = next(line for line in caused if line["message"].startswith("sendEvent "))
    logged = json.loads(send_line["message"].split("sendEvent ", 1)[1])
    assert logged["event"]["credentials"]["password"] == "*" * len(password)
    everything = service.stderr() + service.stdout()
    for secret in (password, bearer, SECRET, bearer.split(".")[2]):
        assert secret not in everything


def full_pipe() -> tuple[int, int]:
    """A pipe whose buffer is full: whoever writes to its (blocking) write end waits for a reader."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write_end, b"." * 65536)
    os.set_blocking(write_end, True)
    return read_end, write_end


def test_a_stuck_log_output_never_blocks_the_caller_and_what_it_drops_is_reported(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_output, "MAX_PENDING_BYTES", 10_000)
    read_end, write_end = full_pipe()
    handler = BufferedStderrHandler(write_end)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    warning = record("the writer is stuck from here")
    warning.levelno, warning.levelname = logging.WARNING, "WARNING"

    def log_a_burst() -> None:  # what the event loop does: it must never wait for the output
        handler.emit(record("first"))
        handler.emit(warning)
        for n in range(1000):
            handler.emit(record(f"line {n:04d} " + "y" * 90))

    caller = threading.Thread(target=log_a_burst)
    caller.start()
    caller.join(10)
    stuck = caller.is_alive()
    drained = bytearray()

    def drain() -> None:
        while chunk := os.read(read_end, 65536):
            drained.extend(chunk)

    threading.Thread(target=drain, daemon=True).start()
    try:
        assert not stuck, "emit() waited for the log output"
        wait_until(lambda: b"log lines were dropped" in drained, timeout=10)
        text = drained.decode()
        assert text.index("INFO first") < text.index("WARNING the writer is stuck") < text.index("INFO line 0000")
        assert "line 0999" not in text  # beyond MAX_PENDING_BYTES: dropped, and counted
    finally:
        caller.join(10)
        handler.close()
        os.close(write_end)


def test_a_flush_never_needs_the_lock_logging_shutdown_holds() -> None:
    """logging.shutdown flushes while it holds the handler's lock. The writer thread's own flush
    must not wait for that lock while holding the write lock, or the process hangs at exit (a
    CLI that failed to start hung so, under load, until its test gave up after 30 s)."""
    read_end, write_end = os.pipe()
    handler = BufferedStderrHandler(write_end)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        handler.handle(record("pending at exit"))
        with handler.lock:  # type: ignore[union-attr]  # as logging.shutdown holds it
            writer = threading.Thread(target=handler.flush)  # the writer thread's tick, meanwhile
            writer.start()
            writer.join(10)
            assert not writer.is_alive(), "a flush waited for the handler's lock"
            handler.flush()
        assert b"pending at exit" in os.read(read_end, 65536)
    finally:
        handler.close()
        os.close(write_end)
        os.close(read_end)
