from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.redis_support import RedisServer
from tests.support import ServiceProcess


@pytest.fixture(scope="session")
def service() -> Iterator[ServiceProcess]:
    """One service with default settings, shared by tests that use unique users and organisations."""
    process = ServiceProcess().start()
    yield process
    process.close()


@pytest.fixture
def make_service() -> Iterator[Callable[..., ServiceProcess]]:
    """A dedicated service with its own settings, e.g. make_service(env={...})."""
    started: list[ServiceProcess] = []

    def factory(**options: Any) -> ServiceProcess:
        wait = options.pop("wait", True)
        process = ServiceProcess(**options).start(wait=wait)
        started.append(process)
        return process

    yield factory
    for process in started:
        process.close()


@pytest.fixture
def unique() -> str:
    """A suffix that keeps a test's users, organisations and endpoint ids apart from other tests'."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server of the test's own: free port, own data dir, AOF fsynced on every write."""
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.close()
