"""Test support: a real Redis server in a subprocess, for the cluster mode's tests.

`RedisServer` runs Debian's `redis-server` (scripts/setup-system installs it) on a free
loopback port, with its own data dir and the AOF on and fsynced on every write, so that a
test can crash it, restart it from its AOF, wipe it, or freeze it (SIGSTOP) to play a
server that stops answering. There is no skip when `redis-server` is missing: the start
fails and says how to install it.

Redis 7 keeps its AOF as a directory (`appenddirname`, `appendonlydir/` in `--dir`): a
manifest, a base file (an RDB, since `aof-use-rdb-preamble` is on) and an incremental
`.incr.aof`. `--save ""` turns RDB snapshots off, so `dump.rdb` only appears after an
explicit SAVE.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support import free_port

# Every server not yet closed, killed at interpreter exit should a test run end without its teardown.
_LIVE: set[RedisServer] = set()
_PR_SET_PDEATHSIG = 1
_SIGKILL = int(signal.SIGKILL)
_LIBC = ctypes.CDLL(None, use_errno=True)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.close()


def _die_with_parent(parent: int) -> None:
    """In the forked child, before exec: SIGKILL when the parent dies, e.g. a worker killed by pytest-timeout."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, _SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: no signal will come
        os._exit(1)


@dataclass(eq=False)
class RedisServer:
    """`redis-server` on 127.0.0.1, its own port and data dir; `restart()` keeps both."""

    args: list[str] = field(default_factory=list)  # more `--name value` options, after the defaults
    ready_timeout: float = 20.0

    def __post_init__(self) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="endpoint-broker-redis-")
        self.data_dir = Path(self._dir.name) / "data"  # --dir: appendonlydir/ and any dump.rdb
        self.data_dir.mkdir()
        self.log_path = Path(self._dir.name) / "redis.log"  # stdout and stderr of every run
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0
        self._clients: list[redis.Redis] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ---------------------------------------------------------- lifecycle

    def start(self, *, first_free_port: bool = True) -> RedisServer:
        """Start and wait until it answers PING (after loading its AOF).

        On the first start only, a port another process took since `free_port()` is
        replaced by a new free one; a restart insists on its port.
        """
        executable = shutil.which("redis-server")
        if executable is None:
            raise RuntimeError(
                "redis-server is not on PATH: the cluster tests need Debian's redis-server package;"
                " run scripts/setup-system (as root) to install it")
        assert not self.running, "already running"
        for attempt in range(3):
            self._spawn(executable)
            try:
                self._wait_ready()
            except _PortTaken:
                if not first_free_port or attempt == 2:
                    raise RuntimeError(f"redis-server could not bind port {self.port}:\n{self.log()}") from None
                self.port = free_port()
            else:
                return self
        raise AssertionError("unreachable")

    def _spawn(self, executable: str) -> None:
        command = [
            executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--protected-mode", "yes", "--loglevel", "warning", *self.args,
        ]
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        # PR_SET_PDEATHSIG fires when the *thread* that forked exits, so only from the main thread.
        parent = os.getpid()
        on_fork = (lambda: _die_with_parent(parent)) if threading.current_thread() is threading.main_thread() \
            else None
        with self.log_path.open("ab") as log:  # appended: the log of a restarted server holds every run
            self.process = subprocess.Popen(
                command, cwd=self.data_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=on_fork,  # noqa: PLW1509
            )
        _LIVE.add(self)

    def _wait_ready(self) -> None:
        log_start = self._log_start
        deadline = time.monotonic() + self.ready_timeout
        probe = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.25, socket_connect_timeout=0.25,
                            retry=Retry(NoBackoff(), 0))
        with probe:  # short timeouts: a miss is only another round, the deadline is the bound
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    if b"Address already in use" in self.log_path.read_bytes()[log_start:]:
                        raise _PortTaken
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{self.log()}")
                # BusyLoadingError (still loading its AOF) is a redis ConnectionError too.
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if probe.ping():
                        return
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"redis-server not answering PING within {self.ready_timeout}s:\n{self.log()}")
                time.sleep(0.02)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process (SIGTERM: a clean shutdown) and wait for it; SIGKILL if it outlasts `timeout`."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            if sig != signal.SIGKILL:
                self.process.send_signal(signal.SIGCONT)  # a paused server only acts on SIGTERM once continued
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._close_clients()
        return self.process.returncode

    def kill(self) -> int | None:
        """SIGKILL: a crash. What was acknowledged is in the AOF (appendfsync always)."""
        return self.stop(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its port and accepts connections, but answers nothing."""
        assert self.process is not None and self.process.poll() is None, "not running"
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT: it answers again, including what was sent while paused."""
        assert self.process is not None and self.process.poll() is None, "not running"
        self.process.send_signal(signal.SIGCONT)

    def restart(self, sig: int = signal.SIGTERM) -> RedisServer:
        """Stop (SIGTERM, or SIGKILL for a crash) and start again on the same port and dir: it reloads its AOF."""
        self.stop(sig)
        return self.start(first_free_port=False)

    def restart_empty(self, sig: int = signal.SIGTERM) -> RedisServer:
        """Stop, delete everything in the data dir (the AOF dir, any dump.rdb), and start on the same port."""
        self.stop(sig)
        for entry in self.data_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        return self.start(first_free_port=False)

    def close(self) -> None:
        """Kill the process if it runs, close the clients, and remove the dir."""
        self.kill()
        self._close_clients()
        self._clients.clear()
        _LIVE.discard(self)
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        if not self.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    # ---------------------------------------------------------- inspection

    def client(self, **options: Any) -> redis.Redis:
        """A sync client on db 0, decoding to str; `options` go to `redis.Redis` (e.g. socket_timeout).

        It is closed with the server's stop() or close(), and reconnects by itself after a restart.
        """
        settings: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5, "socket_connect_timeout": 5}
        settings.update(options)
        client = redis.Redis.from_url(self.url, **settings)
        self._clients.append(client)
        return client

    def _close_clients(self) -> None:
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class _PortTaken(Exception):
    """redis-server exited because its port was taken."""
