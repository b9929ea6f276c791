"""scripts/cluster-demo: one Redis and three nodes on loopback, to try the cluster by hand.

Prints each node's ports, a user token and a SERVICE token (both for the demo's own
random secret), and a few commands that show one endpoint seen from every node. Runs
until Ctrl-C or SIGTERM, then stops the nodes and Redis. Everything lives in a
temporary directory, deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from endpoint_core.principals import mint_token  # noqa: E402 - after the path is set


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"cluster-demo: {what} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    raise SystemExit(f"cluster-demo: {what} did not listen on port {port} within {timeout:.0f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="how many nodes (default 3)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="endpoint-broker-cluster-demo-"))
    secret = secrets.token_urlsafe(32)
    processes: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        redis_port = free_port()
        (work / "redis").mkdir()
        redis = subprocess.Popen(
            ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(work / "redis"),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--loglevel", "warning"],
            stdout=(work / "redis.log").open("wb"), stderr=subprocess.STDOUT)
        processes.append(redis)
        wait_for_port(redis_port, redis, "redis-server")
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        nodes = []
        for index in range(args.nodes):
            http_port, mqtt_port, mqtts_port = free_port(), free_port(), free_port()
            env = {**os.environ, "ENDPOINT_BROKER_JWT_SECRET": secret}
            node = subprocess.Popen(
                [sys.executable, str(ROOT / "run_broker.py"), "--redis-url", redis_url, "--node-id", f"node-{index}",
                 "--http-port", str(http_port), "--mqtt-port", str(mqtt_port), "--mqtts-port", str(mqtts_port)],
                env=env, stdout=(work / f"node-{index}.log").open("wb"), stderr=subprocess.STDOUT)
            processes.append(node)
            nodes.append((f"node-{index}", http_port, mqtt_port, node))
        for name, http_port, _, node in nodes:
            wait_for_port(http_port, node, name)
        user = mint_token(secret, user_id="demo-user", organization_id="demo-org", ttl_seconds=86_400)
        backend = mint_token(secret, user_id="demo-backend", organization_id="demo-org",
                             roles=("ROLE_SERVICE",), ttl_seconds=86_400)
        first, last = nodes[0][1], nodes[-1][1]
        print(f"Redis: {redis_url} (AOF on, fsynced on every write)")
        for name, http_port, mqtt_port, _ in nodes:
            print(f"{name}: HTTP http://127.0.0.1:{http_port}  MQTT 127.0.0.1:{mqtt_port}")
        print(f"\nUSER_TOKEN={user}\nSERVICE_TOKEN={backend}\n")
        print("Register on the first node, then read it from the last:\n")
        print(f"  curl -s -X POST http://127.0.0.1:{first}/rtc-api/users/endpoints -H \"Authorization: Bearer "
              f"$USER_TOKEN\" -H 'Content-Type: application/json' "
              "-d '{\"keepAliveSeconds\": 60, \"userEndpointId\": \"demo-1\"}'")
        print(f"  curl -s http://127.0.0.1:{last}/rtc-api/users/endpoints/demo-1 -H \"Authorization: Bearer "
              "$USER_TOKEN\"\n")
        print(f"Logs: {work}\nReady. Ctrl-C stops the cluster.", flush=True)
        while not stopping:
            for process in processes:
                if process.poll() is not None:
                    print(f"cluster-demo: a process exited (status {process.returncode}); see {work}", flush=True)
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
