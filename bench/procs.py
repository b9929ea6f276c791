"""Child processes: started with logs to a file, killed with the bench, stopped terminate-then-kill."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from bench import httplite

PR_SET_PDEATHSIG = 1
REPO = Path(__file__).resolve().parent.parent


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM if the bench dies, so no broker outlives a crashed run."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def child_setup(cpus: frozenset[int] | None) -> Callable[[], None]:
    """preexec_fn: die with the bench and, if `cpus` is given, run only on those CPUs.

    Pinned in the child before exec, so every thread the program starts later (a store's
    writer thread, an executor) inherits it; setting it on the pid afterwards pins only
    the main thread.
    """
    def setup() -> None:
        die_with_parent()
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
    return setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Managed:
    """A system-under-test process whose stdout and stderr go to `log`."""

    def __init__(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None,
                 cwd: Path = REPO, cpus: frozenset[int] | None = None) -> None:
        self.name, self.argv, self.log, self.env, self.cwd, self.cpus = name, argv, log, env, cwd, cpus
        self.process: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, cwd=self.cwd, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                stdout=log, stderr=log, preexec_fn=child_setup(self.cpus),
            )
        self.ps = psutil.Process(self.process.pid)

    def check_alive(self) -> None:
        if self.process is not None and self.process.returncode is not None:
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}: {tail(self.log)}")

    async def stop(self, grace: float = 5.0) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def wait_for_tcp(managed: Managed, port: int, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        managed.check_alive()
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
        except (OSError, TimeoutError):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"{managed.name}: nothing listens on port {port} after {timeout_s} s") from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return


async def wait_for_http(managed: Managed, port: int, path: str, timeout_s: float) -> None:
    """Until GET `path` answers 200."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    last = "no answer"
    while True:
        managed.check_alive()
        try:
            connection = await httplite.open_connection("127.0.0.1", port, 1.0)
            try:
                status, body = await connection.request(request, 2.0)
            finally:
                connection.close()
            if status == 200:
                return
            last = f"{status} {body[:200]!r}"
        except (OSError, TimeoutError, httplite.HttpError) as exc:
            last = str(exc) or type(exc).__name__
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"{managed.name}: GET {path} not 200 after {timeout_s} s ({last})")
        await asyncio.sleep(0.1)


class WorkerError(RuntimeError):
    """A generator worker failed a command, timed out or died."""


class Worker:
    """A load-generator process (bench.worker) and its JSON-lines pipe."""

    def __init__(self, name: str, log: Path, cpus: frozenset[int] | None = None) -> None:
        self.name, self.log, self.cpus = name, log, cpus
        self.process: asyncio.subprocess.Process | None = None
        self.ps: psutil.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bench.worker", cwd=REPO, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log, preexec_fn=child_setup(self.cpus), limit=1 << 26,
            )
        self.ps = psutil.Process(self.process.pid)

    async def call(self, command: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        process = self.process
        assert process is not None and process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(command).encode() + b"\n")
        try:
            await process.stdin.drain()
            line = await asyncio.wait_for(process.stdout.readline(), timeout_s)
        except TimeoutError:
            await self.kill()
            raise WorkerError(f"{self.name}: {command['cmd']} did not answer within {timeout_s:.0f} s") from None
        except (ConnectionError, BrokenPipeError) as exc:
            raise WorkerError(f"{self.name} died: {exc} {tail(self.log)}") from None
        if not line:
            raise WorkerError(f"{self.name} exited during {command['cmd']}: {tail(self.log)}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(f"{self.name}: {command['cmd']} failed: {reply.get('error')}")
        return reply

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()

    async def stop(self) -> None:
        """Ask it to abort its connections and exit; kill it if it does not."""
        if self.process is None or self.process.returncode is not None:
            return
        with contextlib.suppress(WorkerError, OSError, ValueError):
            await self.call({"cmd": "close"}, 10.0)
        try:
            await asyncio.wait_for(self.process.wait(), 5.0)
        except TimeoutError:
            await self.kill()


# Lines in a process's log worth a look even when the numbers came out.
LOG_PROBLEM = re.compile(r"Traceback|\bERROR\b|\bCRITICAL\b|Error:")


def log_problems(processes: Iterable[Managed], width: int = 240) -> list[str]:
    """One note per process whose log has tracebacks or ERROR lines, with the first of them."""
    notes = []
    for process in processes:
        try:
            lines = process.log.read_text(errors="replace").splitlines()
        except OSError:
            continue
        problems = [line for line in lines if LOG_PROBLEM.search(line)]
        if problems:
            notes.append(f"{process.name} log ({process.log.name}) has {len(problems)} problem line(s), "
                         f"first: {problems[0][:width]}")
    return notes
