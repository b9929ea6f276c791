"""sendEvent's rules: the command, the event's type and timestamp, qos, and masks (unit tests of the core)."""

from __future__ import annotations

from typing import Any

import pytest

from endpoint_core.errors import InvalidInput
from endpoint_core.events import MAX_MASK_WORK, MAX_MASKS, compile_masks, masked, parse_send_event, validate_event
from tests.support import event


def refused(body: dict[str, Any]) -> str | None:
    """The field parse_send_event blames for `body`."""
    with pytest.raises(InvalidInput) as caught:
        parse_send_event(body)
    assert caught.value.detail
    return caught.value.field


# ------------------------------------------------------------- the command


def test_a_minimal_command() -> None:
    command = parse_send_event({"userId": "u", "event": event()})
    assert command.event == event()
    assert (command.user_id, command.endpoint_id, command.organization_id, command.qos, command.masks) == (
        "u", None, None, 0, ())


def test_a_full_command() -> None:
    command = parse_send_event({"userId": "u", "userEndpointId": "e1", "organizationId": "o", "qos": 1,
                                "event": event(secret="pw"), "masks": ["$.secret"]})
    assert (command.user_id, command.endpoint_id, command.organization_id, command.qos) == ("u", "e1", "o", 1)
    assert masked(command.event, command.masks)["secret"] == "**"


def test_null_optional_fields_are_absent() -> None:
    command = parse_send_event({"userId": "u", "event": event(), "userEndpointId": None, "organizationId": None,
                                "qos": None, "masks": None})
    assert (command.endpoint_id, command.organization_id, command.qos, command.masks) == (None, None, 0, ())


@pytest.mark.parametrize(("body", "field"), [
    ({"userId": "u"}, "event"),
    ({"userId": "u", "event": "CallCreatedEvent"}, "event"),
    ({"userId": "u", "event": [event()]}, "event"),
    ({"event": event()}, "userId"),
    ({"userId": "", "event": event()}, "userId"),
    ({"userId": 7, "event": event()}, "userId"),
    ({"userId": "u", "event": event(), "userEndpointId": 5}, "userEndpointId"),
    ({"userId": "u", "event": event(), "userEndpointId": "a/b"}, "userEndpointId"),
    ({"userId": "u", "event": event(), "userEndpointId": ""}, "userEndpointId"),
    ({"userId": "u", "event": event(), "organizationId": 5}, "organizationId"),
    ({"userId": "u", "event": event(), "organizationId": ""}, "organizationId"),
])
def test_invalid_commands_name_the_field(body: dict[str, Any], field: str) -> None:
    assert refused(body) == field


def test_the_event_is_checked_before_the_rest() -> None:
    assert refused({"event": event("bad")}) == "event.type"


# --------------------------------------------------------- type, timestamp


@pytest.mark.parametrize("event_type", [
    "CallCreatedEvent", "ConferenceStreamPublishedEvent", "IceCandidatesFoundEvent", "Snapshot2AcquiredEvent",
    "SipCallCreatedEvent",
])
@pytest.mark.parametrize("timestamp", [
    "2011-12-03T10:15:30Z", "2011-12-03T10:15:30.123Z", "2011-12-03T10:15:30.123456789Z",
    "2012-02-29T23:59:59Z",  # a leap day
])
def test_valid_types_and_timestamps(event_type: str, timestamp: str) -> None:
    validate_event(event(event_type, timestamp=timestamp))
    assert parse_send_event({"userId": "u", "event": event(event_type, timestamp=timestamp)}).event["type"] == (
        event_type)


@pytest.mark.parametrize("event_type", [
    None, 1, "", "callCreated", "callCreatedEvent", "Event", "CallEvent", "CallCreated", "Call_CreatedEvent",
    "CallCreatedEvents", "CALLCreatedEvent", "Call CreatedEvent", "CallCreatedEvent\n", "ÄrgerCreatedEvent",
])
def test_invalid_types(event_type: object) -> None:
    body = event(timestamp="2011-12-03T10:15:30Z")
    if event_type is None:
        del body["type"]
    else:
        body["type"] = event_type
    assert refused({"userId": "u", "event": body}) == "event.type"


@pytest.mark.parametrize("timestamp", [
    None, 1322907330, "", "2011-12-03T10:15:30", "2011-12-03T10:15:30+01:00", "2011-12-03T10:15:30+00:00",
    "2011-12-03", "2011-12-03 10:15:30Z", "2011-12-03t10:15:30z", "2011-12-03T10:15:30.Z",
    "2011-12-03T10:15:30.1234567890Z", "11-12-03T10:15:30Z",
    # Well formed but not on the calendar or the clock.
    "2011-13-03T10:15:30Z", "2011-00-03T10:15:30Z", "2011-02-29T10:15:30Z", "2011-04-31T10:15:30Z",
    "2011-12-03T25:15:30Z", "2011-12-03T24:00:00Z", "2011-12-03T10:60:30Z", "2011-12-03T23:59:60Z",
    # Digits that are not ASCII digits.
    "2011-12-03T10:15:30.\u0661\u0662Z", "\u0662011-12-03T10:15:30Z",
])
def test_invalid_timestamps(timestamp: object) -> None:
    body: dict[str, Any] = {"type": "CallCreatedEvent"}
    if timestamp is not None:
        body["timestamp"] = timestamp
    assert refused({"userId": "u", "event": body}) == "event.timestamp"


# --------------------------------------------------------------------- qos


@pytest.mark.parametrize(("qos", "parsed"), [(None, 0), (0, 0), (1, 1), (2, 0), (-1, 0), (7, 0)])
def test_qos_1_is_at_least_once_and_any_other_integer_best_effort(qos: object, parsed: int) -> None:
    assert parse_send_event({"userId": "u", "event": event(), "qos": qos}).qos == parsed


@pytest.mark.parametrize("qos", ["1", 1.0, True, False, [1], {"qos": 1}])
def test_qos_must_be_an_integer(qos: object) -> None:
    assert refused({"userId": "u", "event": event(), "qos": qos}) == "qos"


# ------------------------------------------------------------------- masks


SECRETS = event(credentials={"password": "hunter2"}, guests=[{"role": "host", "pin": "1234"},
                                                              {"role": "guest", "pin": "99"}],
                items=["a", "bb", "ccc"], note="visible")


@pytest.mark.parametrize(("mask", "hidden"), [
    ("$.credentials.password", {"credentials": {"password": "*******"}}),
    ("credentials.password", {"credentials": {"password": "*******"}}),  # '$.' may be left out
    ("$.guests[0].pin", {"guests": [{"role": "host", "pin": "****"}, {"role": "guest", "pin": "99"}]}),
    ("$.guests[*].pin", {"guests": [{"role": "host", "pin": "****"}, {"role": "guest", "pin": "**"}]}),
    ("$..pin", {"guests": [{"role": "host", "pin": "****"}, {"role": "guest", "pin": "**"}]}),
    ("$.guests[?(@.role == 'host')].pin", {"guests": [{"role": "host", "pin": "****"},
                                                      {"role": "guest", "pin": "99"}]}),
    ("$.items[1:]", {"items": ["a", "**", "***"]}),
    ("$.items[-1]", {"items": ["a", "bb", "***"]}),
    ("$.*.password", {"credentials": {"password": "*******"}}),
])
def test_masks_select_strings_and_hide_them_keeping_their_length(mask: str, hidden: dict[str, Any]) -> None:
    logged = masked(SECRETS, compile_masks([mask], SECRETS))
    assert logged == {**SECRETS, **hidden}


def test_masking_leaves_the_event_itself_alone() -> None:
    original = event(credentials={"password": "hunter2"})
    logged = masked(original, compile_masks(["$.credentials.password"], original))
    assert original["credentials"]["password"] == "hunter2"
    assert logged["credentials"]["password"] == "*******"


def test_without_masks_the_event_is_logged_as_is_and_not_copied() -> None:
    original = event()
    assert masked(original, compile_masks(None, original)) is original
    assert masked(original, compile_masks([], original)) is original


def test_a_mask_that_matches_nothing_hides_nothing() -> None:
    assert compile_masks(["$.nothing", "$..nowhere"], SECRETS) == ()


def test_several_masks_combine() -> None:
    logged = masked(SECRETS, compile_masks(["$.credentials.password", "$.note", "$..pin"], SECRETS))
    assert logged["note"] == "*******"
    assert logged["credentials"]["password"] == "*******"
    assert [g["pin"] for g in logged["guests"]] == ["****", "**"]


@pytest.mark.parametrize(("event_fields", "masks", "field"), [
    ({}, "$.secret", "masks"),
    ({}, {"$.secret": True}, "masks"),
    ({}, [5], "masks[0]"),
    ({}, [""], "masks[0]"),
    ({}, [None], "masks[0]"),
    ({}, ["$.ok", "$.["], "masks[1]"),
    ({}, ["$..["], "masks[0]"),
    # Selecting something that is not a string: only strings can be masked.
    ({"n": 5}, ["$.n"], "masks[0]"),
    ({"inner": {"a": "b"}}, ["$.inner"], "masks[0]"),
    ({"items": ["x", 2]}, ["$.items[*]"], "masks[0]"),
    ({}, ["$"], "masks[0]"),
    # Functions and the like compute values instead of naming places: masking them would hide nothing.
    ({"password": "pw"}, ["$.password.`sub(/zzz/, q)`"], "masks[0]"),
    ({"password": "pw"}, ["$.password.`split(a, 0, -1)`"], "masks[0]"),
    ({"items": ["pw"]}, ["$.items.`len`"], "masks[0]"),
    ({"inner": {"pw": "x"}}, ["$.inner.pw.`parent`"], "masks[0]"),
    ({"password": "pw"}, ["$.ok", "$.password.`str()`"], "masks[1]"),
])
def test_invalid_masks_name_the_mask(event_fields: dict[str, Any], masks: object, field: str) -> None:
    assert refused({"userId": "u", "event": event(**event_fields), "masks": masks}) == field


def test_at_most_16_masks() -> None:
    assert MAX_MASKS == 16
    parse_send_event({"userId": "u", "event": event(), "masks": ["$.type"] * MAX_MASKS})
    assert refused({"userId": "u", "event": event(), "masks": ["$.type"] * (MAX_MASKS + 1)}) == "masks"


def test_masks_may_not_search_too_much() -> None:
    """masks x values in the event stays within MAX_MASK_WORK: one request cannot stall the event loop."""
    assert MAX_MASK_WORK == 20_000
    # event() holds 4 values besides `items` (itself, type, timestamp, the list): 1246 items make 1250 values.
    largest = event(items=list(range(1246)))
    assert parse_send_event({"userId": "u", "event": largest, "masks": ["$..zz"] * 16}).masks == ()
    assert refused({"userId": "u", "event": event(items=list(range(1247))), "masks": ["$..zz"] * 16}) == "masks"
    assert refused({"userId": "u", "event": event(items=list(range(4000))), "masks": ["$..zz"] * 6}) == "masks"


def test_the_work_limit_ignores_an_empty_mask_list() -> None:
    assert parse_send_event({"userId": "u", "event": event(items=list(range(30_000))), "masks": []}).masks == ()


def test_a_date_is_judged_the_same_every_time() -> None:
    """Dates are remembered once checked against the calendar: the verdict must not change."""
    for _ in range(3):
        validate_event(event(timestamp="2012-02-29T10:15:30Z"))
        assert refused({"userId": "u", "event": event(timestamp="2011-02-29T10:15:30Z")}) == "event.timestamp"
