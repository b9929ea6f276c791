"""What the numbers were measured on: hardware, OS, Python, package versions, the code's commit."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

from bench.systems import mosquitto_binary

PACKAGES = ("amqtt", "starlette", "uvicorn", "uvloop", "httptools", "orjson", "aiomqtt", "paho-mqtt", "PyJWT",
            "psutil")
REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def distro() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.platform()


def _run(argv: list[str], cwd: Path = REPO) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()


def mosquitto_version() -> str | None:
    binary = mosquitto_binary()
    if binary is None:
        return None
    first = _run([binary, "-h"]).splitlines()
    return first[0].replace("mosquitto version ", "") if first else "unknown"


def code_version(ours_dir: Path) -> str:
    """The commit of the code measured as ours (read-only git queries)."""
    if not (ours_dir / ".git").exists():
        return f"{ours_dir} (not a git checkout)"
    commit = _run(["git", "rev-parse", "--short", "HEAD"], ours_dir) or "unknown"
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], ours_dir)
    return f"{commit}{' + uncommitted changes' if dirty else ''}" + ("" if ours_dir == REPO else f" in {ours_dir}")


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "-"
    return found


def describe(ours_dir: Path = REPO) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gb": round(memory.total / 2**30, 1),
        "ram_available_gb": round(memory.available / 2**30, 1),
        "kernel": platform.release(),
        "os": distro(),
        "python": sys.version.split()[0],
        "packages": versions(),
        "mosquitto": mosquitto_version(),
        "code": code_version(ours_dir),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
