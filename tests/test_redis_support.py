"""The Redis harness of the cluster tests (tests/redis_support.py) against a real redis-server."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.redis_support import RedisServer


def test_runs_with_the_aof_fsynced_on_every_write(redis_server: RedisServer) -> None:
    client = redis_server.client()
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("dir") == {"dir": str(redis_server.data_dir)}
    # Redis 7: the AOF is a directory of files (manifest, base, incr), not one appendonly.aof.
    aof_dir = client.config_get("appenddirname")["appenddirname"]
    assert aof_dir == "appendonlydir"
    assert sorted(path.suffix for path in (redis_server.data_dir / aof_dir).iterdir()) == [".aof", ".manifest", ".rdb"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["clean", "crash"])
def test_a_key_survives_restart_and_is_gone_after_restart_empty(redis_server: RedisServer, sig: int) -> None:
    client = redis_server.client()
    client.set("survivor", "yes")
    port, pid = redis_server.port, redis_server.pid

    redis_server.restart(sig)
    assert redis_server.port == port
    assert redis_server.pid != pid
    assert client.get("survivor") == "yes"

    redis_server.restart_empty()
    assert redis_server.port == port
    assert client.get("survivor") is None
    assert client.dbsize() == 0


def test_a_paused_server_times_out_and_answers_after_resume(redis_server: RedisServer) -> None:
    client = redis_server.client(socket_timeout=0.2, retry=Retry(NoBackoff(), 0))
    client.set("k", "v")

    redis_server.pause()
    with pytest.raises(redis.TimeoutError):
        client.get("k")

    redis_server.resume()
    assert client.get("k") == "v"


def test_stop_reaches_a_paused_server_and_close_removes_everything() -> None:
    with RedisServer() as server:
        directory = server.data_dir.parent
        server.pause()
        assert server.stop() == 0  # SIGTERM, then SIGCONT so that it acts on it: a clean exit
        assert not server.running
        server.start()
        pid = server.pid
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_without_redis_server_on_path_start_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(RuntimeError, match=r"scripts/setup-system \(as root\)"), RedisServer():
        pass


def test_a_taken_port_moves_the_first_start_but_fails_a_restart() -> None:
    with RedisServer() as server:
        taken = server.port
        server.stop()
        with socket.create_server(("127.0.0.1", taken)):
            with pytest.raises(RuntimeError, match=f"could not bind port {taken}"):
                server.restart()
            fresh = RedisServer()
            fresh.port = taken
            with fresh:
                assert fresh.port != taken
                assert fresh.client().ping()
