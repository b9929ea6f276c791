"""The systems under test, each started as its own processes on free loopback ports.

- ours: run_broker.py (broker and HTTP bridge in one process).
- ours-memory, ours-nometrics: ours with --store memory, or with metrics off (what durability,
  or metrics, cost is the difference to `ours`).
- before, before-memory: ours and ours-memory run from --before-dir (an export of an older
  commit), in the same invocation: the no-regression check of issues 8 and 9.
- amqtt: bare amqtt 0.12.1 (bench.amqtt_broker) + the DIY publisher for sendEvent.
- mosquitto: Debian's mosquitto with a generated config + the DIY publisher.
- lean: the same mosquitto + the lean publisher (no token check, one publish per
  endpoint topic; issue 13's baseline, for the --issue13 profile's one endpoint per user).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

from bench import procs
from bench.plan import TopicStyle

START_TIMEOUT_S = 30.0
# A restart (the reconnect storm) gives the service this long to stop before it is killed.
RESTART_STOP_GRACE_S = 15.0
SYSTEMS = ("ours", "ours-memory", "ours-nometrics", "before", "before-memory", "amqtt", "mosquitto", "lean")
# ours-memory (ours with --store memory) and ours-nometrics (ours with metrics off) are measured
# only when named in --targets; lean only where every user owns one endpoint (its sendEvent
# targets userEndpointId).
DEFAULT_SYSTEMS = ("ours", "amqtt", "mosquitto")
# Systems whose broker is Debian's mosquitto.
MOSQUITTO_BASED = ("mosquitto", "lean")
# Systems that run this repository's run_broker.py.
OURS_BASED = ("ours", "ours-memory", "ours-nometrics")
# Systems that run --before-dir's run_broker.py instead.
BEFORE_BASED = ("before", "before-memory")


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if os.access(p, os.X_OK)), None)


class System:
    """One system under test. `broker` is the process whose RSS and keepalive CPU are reported."""

    name = ""
    style = TopicStyle.USER
    publisher_module = "bench.diy_publisher"  # the HTTP app beside a plain broker

    def __init__(self, workdir: Path, tag: str, secret: str, with_http: bool, log_level: str,
                 ours_dir: Path = procs.REPO, cpus: frozenset[int] | None = None) -> None:
        self.workdir, self.tag, self.secret = workdir, tag, secret
        self.with_http, self.log_level, self.ours_dir = with_http, log_level, ours_dir
        self.cpus = cpus  # every process of the system runs on these CPUs (None: anywhere)
        self.mqtt_port = procs.free_port()
        self.http_port = procs.free_port()
        self.broker: procs.Managed | None = None
        self.publisher: procs.Managed | None = None

    def log(self, what: str) -> Path:
        return self.workdir / f"{self.tag}-{what}.log"

    @property
    def processes(self) -> list[procs.Managed]:
        return [p for p in (self.broker, self.publisher) if p is not None]

    async def start(self) -> None:
        await self.start_broker()
        if self.with_http and self.publisher is None and not isinstance(self, Ours):
            env = {**os.environ, "BENCH_JWT_SECRET": self.secret}
            self.publisher = procs.Managed(
                self.publisher_module.removeprefix("bench.").replace("_", "-"),
                [sys.executable, "-m", self.publisher_module, "--broker-port", str(self.mqtt_port),
                 "--http-port", str(self.http_port)],
                self.log("publisher"), env, cpus=self.cpus)
            await self.publisher.start()
            await procs.wait_for_http(self.publisher, self.http_port, "/healthz", START_TIMEOUT_S)

    async def start_broker(self) -> None:
        raise NotImplementedError

    async def stop(self, grace: float = 5.0) -> None:
        # The publisher first: it is a client of the broker.
        for process in reversed(self.processes):
            await process.stop(grace)

    async def start_again(self) -> None:
        """After stop(): start every process again on the same ports (ours: on the same data dir).
        The new processes append to the same logs."""
        self.broker = self.publisher = None
        await self.start()


class Ours(System):
    """endpoint-broker with its default, durable store (SQLite in a fresh data dir per session)."""

    name = "ours"
    style = TopicStyle.ENDPOINT
    store = "sqlite"
    extra_env: tuple[tuple[str, str], ...] = ()  # a variant's own settings, as environment variables
    data_dir: str | None = None

    async def start_broker(self) -> None:
        if self.data_dir is None:
            # A fresh data dir per session: a store left by the last session would restore its endpoints.
            # A restart within the session keeps it: that is what the reconnect storm measures.
            self.data_dir = tempfile.mkdtemp(prefix=f"{self.tag}-data-", dir=self.workdir)
        env = {**os.environ, "ENDPOINT_BROKER_JWT_SECRET": self.secret, "ENDPOINT_BROKER_LOG_LEVEL": self.log_level,
               "ENDPOINT_BROKER_STORE": self.store, "ENDPOINT_BROKER_DATA_DIR": self.data_dir,
               **dict(self.extra_env)}
        self.broker = procs.Managed(
            "endpoint-broker",
            [sys.executable, "run_broker.py", "--host", "127.0.0.1", "--mqtt-port", str(self.mqtt_port),
             "--http-port", str(self.http_port)],
            self.log("broker"), env, cwd=self.ours_dir, cpus=self.cpus)
        await self.broker.start()
        await procs.wait_for_http(self.broker, self.http_port, "/healthz", START_TIMEOUT_S)


class OursMemory(Ours):
    """endpoint-broker with --store memory: what durability costs is the difference to `ours`."""

    name = "ours-memory"
    store = "memory"


class OursNoMetrics(Ours):
    """endpoint-broker with metrics off: what metrics cost (issue 11: at most 3%) is the difference to `ours`."""

    name = "ours-nometrics"
    extra_env = (("ENDPOINT_BROKER_METRICS_ENABLED", "false"),)


class Before(Ours):
    """ours as an older commit had it (--before-dir), measured in the same run as today's code."""

    name = "before"


class BeforeMemory(Before):
    name = "before-memory"
    store = "memory"


class BareAmqtt(System):
    name = "amqtt"

    async def start_broker(self) -> None:
        self.broker = procs.Managed(
            "amqtt", [sys.executable, "-m", "bench.amqtt_broker", "--port", str(self.mqtt_port)], self.log("broker"),
            cpus=self.cpus)
        await self.broker.start()
        await procs.wait_for_tcp(self.broker, self.mqtt_port, START_TIMEOUT_S)


class Mosquitto(System):
    name = "mosquitto"

    async def start_broker(self) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (scripts/bench installs it with apt-get)")
        config = self.workdir / f"{self.tag}-mosquitto.conf"
        config.write_text(
            f"listener {self.mqtt_port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
            "connection_messages false\n"
        )
        self.broker = procs.Managed("mosquitto", [binary, "-c", str(config)], self.log("broker"), cpus=self.cpus)
        await self.broker.start()
        await procs.wait_for_tcp(self.broker, self.mqtt_port, START_TIMEOUT_S)


class Lean(Mosquitto):
    """The same Mosquitto + the lean publisher: no token check, one publish to the targeted endpoint's topic."""

    name = "lean"
    style = TopicStyle.ENDPOINT
    publisher_module = "bench.lean_publisher"


def snapshot_ours(repo: Path, destination: Path) -> str:
    """Copy the service's code (run_broker.py and its packages) so that every session of a run
    measures the same code, even while the working tree is being edited. Returns a content hash."""
    packages = [d for d in sorted(repo.iterdir())
                if (d / "__init__.py").is_file() and d.name not in ("bench", "tests")]
    destination.mkdir(parents=True)
    shutil.copy2(repo / "run_broker.py", destination / "run_broker.py")
    for package in packages:
        shutil.copytree(package, destination / package.name, ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for path in sorted(destination.rglob("*.py")):
        digest.update(str(path.relative_to(destination)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def make_system(name: str, workdir: Path, tag: str, secret: str, with_http: bool, log_level: str,
                ours_dir: Path = procs.REPO, cpus: frozenset[int] | None = None) -> System:
    kinds: dict[str, type[System]] = {"ours": Ours, "ours-memory": OursMemory, "ours-nometrics": OursNoMetrics,
                                      "before": Before, "before-memory": BeforeMemory,
                                      "amqtt": BareAmqtt, "mosquitto": Mosquitto, "lean": Lean}
    return kinds[name](workdir, tag, secret, with_http, log_level, ours_dir, cpus)
