"""scripts/cluster-demo: it starts Redis and the nodes, prints what it promises, and stops them all."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.support import ROOT


def test_the_demo_prints_working_ports_and_a_token_and_stops_everything() -> None:
    demo = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "cluster_demo.py"), "--nodes", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert demo.stdout is not None
        printed = []
        for line in demo.stdout:  # ends at "Ready", or at EOF if the demo failed
            printed.append(line)
            if line.startswith("Ready."):
                break
        text = "".join(printed)
        assert "Ready." in text, text
        redis_port = int(re.search(r"Redis: redis://127\.0\.0\.1:(\d+)/0", text).group(1))  # type: ignore[union-attr]
        http_ports = [int(p) for p in re.findall(r"node-\d: HTTP http://127\.0\.0\.1:(\d+)", text)]
        user_token = re.search(r"USER_TOKEN=(\S+)", text).group(1)  # type: ignore[union-attr]
        assert len(http_ports) == 2
        headers = {"Authorization": f"Bearer {user_token}"}
        registered = httpx.post(f"http://127.0.0.1:{http_ports[0]}/rtc-api/users/endpoints", headers=headers,
                                json={"keepAliveSeconds": 60, "userEndpointId": "demo-1"}, timeout=10)
        assert registered.status_code == 200, registered.text
        seen = httpx.get(f"http://127.0.0.1:{http_ports[1]}/rtc-api/users/endpoints/demo-1", headers=headers,
                         timeout=10)
        assert seen.status_code == 200 and seen.json()["id"] == "demo-1"
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(30) == 0
        for port in (redis_port, *http_ports):  # every process it started is gone
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
