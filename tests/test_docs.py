"""The README is part of the contract: it must keep up with the code."""

from __future__ import annotations

import dataclasses
import re

from config.settings import Settings
from tests.support import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_documented() -> None:
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", README, flags=re.MULTILINE))
    assert documented == {f.name for f in dataclasses.fields(Settings)}


def test_the_two_newcomer_commands_come_first_and_exist() -> None:
    first_block = README.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split()[0] for line in first_block.strip().splitlines()]
    assert commands == ["scripts/serve", "scripts/test"]
    for command in commands:
        assert (ROOT / command).stat().st_mode & 0o111, f"{command} is not executable"
    assert "scripts/test" in (ROOT / ".ci" / "run").read_text()
