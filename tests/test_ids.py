"""Endpoint id rules, shared by REST and MQTT (unit tests of the core)."""

from __future__ import annotations

import re

import pytest

from endpoint_core.errors import Conflict, InvalidInput
from endpoint_core.ids import endpoint_id_problem
from endpoint_core.table import EndpointTable, TablePolicy
from tests.test_table import Clock, FakeLink


@pytest.mark.parametrize("endpoint_id", [
    "zero\u200bwidth", "rtl\u202eoverride", "esc\x1b[31m", "del\x7f", "c1\x9b", "bom\ufeff", "soft\xadhyphen",
])
def test_control_and_format_characters_are_refused(endpoint_id: str) -> None:
    assert endpoint_id_problem(endpoint_id) is not None


@pytest.mark.parametrize("endpoint_id", ["my-tab", "tab:é", "日本", "a.b_c~d", "6f1c8a3e-4b7d-4f3a-9c2e-0d5b1a7e9f10"])
def test_ordinary_ids_are_accepted(endpoint_id: str) -> None:
    assert endpoint_id_problem(endpoint_id) is None


UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


def test_the_endpoint_id_pattern_must_match_the_whole_id_on_register_and_connect() -> None:
    table = EndpointTable(TablePolicy(endpoint_id_pattern=UUID), clock=Clock())
    good = "6f1c8a3e-4b7d-4f3a-9c2e-0d5b1a7e9f10"
    table.register("u", "o", good, 30, False)
    for bad in ("my-tab", good + "x", "x" + good):
        with pytest.raises(InvalidInput) as caught:
            table.register("u", "o", bad, 30, False)
        assert caught.value.field == "userEndpointId"
        with pytest.raises(InvalidInput) as caught:
            table.connect("u", "o", bad, 30, FakeLink(), False)
        assert caught.value.field == "client id"
    created, _ = table.register("u", "o", None, 30, False)  # the ids the server makes match a UUID pattern
    assert re.fullmatch(UUID, created.id)


def test_without_a_pattern_any_valid_id_is_accepted() -> None:
    table = EndpointTable(TablePolicy(), clock=Clock())
    table.register("u", "o", "my-tab", 30, False)


def test_a_conflict_says_nothing_about_the_owner() -> None:
    table = EndpointTable(TablePolicy(), clock=Clock())
    table.register("alice", "org-a", "squatted", 30, False)
    details = []
    for user, organization in (("bob", "org-a"), ("carol", "org-b")):
        with pytest.raises(Conflict) as caught:
            table.register(user, organization, "squatted", 30, False)
        details.append(caught.value.detail)
    assert details[0] == details[1]  # same words whether or not the owner is in the caller's organisation
    assert not any(word in details[0] for word in ("alice", "org-a", "user", "organisation", "organization"))
