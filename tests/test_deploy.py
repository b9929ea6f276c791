"""Deploy artefacts: the example config and `genconfig` match the code."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import yaml

from config import Settings, load_settings
from tests.support import ROOT

EXAMPLE = ROOT / "config" / "example.yaml"


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
