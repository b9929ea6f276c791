"""Deploy artefacts: the example config, `genconfig`, the systemd unit and the Containerfile match the code."""

from __future__ import annotations

import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from config import Settings, load_settings
from tests.support import ROOT

EXAMPLE = ROOT / "config" / "example.yaml"
UNIT = ROOT / "deploy" / "endpoint-broker.service"
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
INSTALL_DIR = "/opt/endpoint-broker"  # where the unit expects the repository and its .venv


# ------------------------------------------------------------------ config/example.yaml

def test_the_example_config_lists_every_setting_with_its_default() -> None:
    listed = yaml.safe_load(EXAMPLE.read_text())
    defaults = {f.name: getattr(Settings(), f.name) for f in dataclasses.fields(Settings)}
    missing = [name for name in defaults if name not in listed]
    assert not missing, (f"config/example.yaml lacks {', '.join(missing)}: add a line "
                         "`name: default  # what it does` for each setting added to config/settings.py")
    unknown = [name for name in listed if name not in defaults]
    assert not unknown, f"config/example.yaml lists {', '.join(unknown)}, which config/settings.py does not have"
    wrong = [f"{name}: example.yaml has {listed[name]!r}, Settings has {default!r}"
             for name, default in defaults.items() if listed[name] != default]
    assert not wrong, "config/example.yaml has wrong defaults: " + "; ".join(wrong)


def test_every_example_setting_has_a_one_line_comment() -> None:
    lines = [line for line in EXAMPLE.read_text().splitlines() if re.match(r"[a-z_]+:", line)]
    uncommented = [line.split(":", 1)[0] for line in lines if not re.search(r"\S  # \S", line)]
    assert lines and not uncommented, f"config/example.yaml: no `  # comment` after {', '.join(uncommented)}"


def test_the_example_config_loads_as_the_defaults() -> None:
    assert load_settings({}, str(EXAMPLE)) == Settings()


def test_genconfig_prints_the_example_config() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "run_broker.py"), "genconfig"], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == EXAMPLE.read_text()


# ------------------------------------------------------------------ deploy/endpoint-broker.service

def unit_directives() -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            directives.setdefault(key.strip(), []).append(value.strip())
    return directives


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: scripts/setup-system installs it (Debian package systemd)"
    # Installed with this checkout as the install directory, so that ExecStart names a real program.
    installed = tmp_path / UNIT.name
    installed.write_text(UNIT.read_text().replace(INSTALL_DIR, str(ROOT)))
    result = subprocess.run([analyze, "verify", str(installed)], capture_output=True, text=True, timeout=60,
                            check=False)
    # verify exits 0 on unknown keys and bad values too, and only prints them: any output is a finding.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_unit_is_sandboxed_and_reloadable() -> None:
    unit = unit_directives()
    state = unit["StateDirectory"][0]
    assert unit["ExecStart"] == [f"{INSTALL_DIR}/.venv/bin/python {INSTALL_DIR}/run_broker.py"]
    assert (ROOT / "run_broker.py").is_file()
    assert {key: unit.get(key) for key in ("DynamicUser", "NoNewPrivileges", "ProtectSystem")} == \
        {"DynamicUser": ["yes"], "NoNewPrivileges": ["yes"], "ProtectSystem": ["strict"]}
    assert f"ENDPOINT_BROKER_DATA_DIR=%S/{state}" in unit["Environment"]
    assert int(unit["LimitNOFILE"][0]) > 100_000
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"]


# ------------------------------------------------------------------ deploy/Containerfile

def containerfile_instructions() -> list[tuple[str, list[str]]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), shlex.split(line)[1:]) for line in lines]


def test_the_containerfile_copies_only_files_of_the_repository() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    tracked_paths = set(tracked) | {str(parent) for path in tracked for parent in Path(path).parents}
    sources = [source.rstrip("/") or "." for kind, arguments in containerfile_instructions()
               if kind in ("COPY", "ADD") for source in [a for a in arguments if not a.startswith("--")][:-1]]
    assert sources
    absent = [source for source in sources if source not in tracked_paths]
    assert not absent, f"deploy/Containerfile copies {absent}, which are not in the repository"


def test_the_container_runs_unprivileged_with_its_data_on_a_volume() -> None:
    instructions = dict(containerfile_instructions())
    assert instructions["FROM"][0].endswith("-slim")
    assert instructions["USER"] not in (["root"], ["0"])
    assert "ENDPOINT_BROKER_DATA_DIR=/data" in instructions["ENV"]
    assert instructions["VOLUME"] == ["/data"]
    assert set(instructions["EXPOSE"]) == {str(Settings.mqtt_port), str(Settings.mqtts_port), str(Settings.http_port)}
