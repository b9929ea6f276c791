"""sendEvent's rules: what a valid event is, and how masks hide fields before logging.

Masks are JSONPath expressions (jsonpath-ng, extended syntax) that select:
fields, indexes, slices, wildcards, `..` and filters; not functions. Every string a
mask matches is replaced by `*` of the same length in anything logged or stored;
subscribers always receive the event as given. Masks are searched once, when the
request is checked, and the paths found are reused to make the logged copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

from cachetools import LRUCache
from jsonpath_ng.ext.filter import Expression, Filter
from jsonpath_ng.ext.parser import parse as parse_jsonpath
from jsonpath_ng.ext.string import Sub
from jsonpath_ng.jsonpath import Child, Descendants, Fields, Index, JSONPath, Root, Slice, This, Wildcard

from endpoint_core.errors import InvalidInput
from endpoint_core.ids import require_endpoint_id

# A capital first letter, at least two CamelCase words (a noun and a verb), then
# `Event`: CallCreatedEvent, ConferenceStreamPublishedEvent. Acronyms are
# written as words (SipCallCreatedEvent), as in the platform's own event names.
EVENT_TYPE = re.compile(r"(?:[A-Z][a-z0-9]+){2,}Event")
# An ISO-8601 instant in UTC with the Z suffix and optional fractional seconds.
# Hours, minutes and seconds are range-checked here; the date against the calendar (_is_date).
EVENT_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,9})?Z", re.ASCII)
# Dates already checked against the calendar: a burst of events shares a handful of them.
_KNOWN_DATES: dict[str, bool] = {}
_MAX_KNOWN_DATES = 1024

_SELECTING_STEPS = (Root, This, Fields, Index, Slice, Wildcard, Filter)

MAX_MASKS = 16
# What one request's masks may cost to parse: parsing runs on the event loop, and a
# compiled mask holds about 50 bytes per character of its text.
MAX_MASK_CHARACTERS = 512
MAX_MASKS_CHARACTERS = 2048  # all masks of one request together
# Steps (`.x`, `[0]`, `..`, filter terms) in one mask, counted on the text before
# parsing, so that a deeply nested mask never reaches the (recursive) parser.
MAX_MASK_STEPS = 32
# The compiled-mask cache is bounded by the characters it holds, not by entries:
# about 3 MB at most, whether the masks are short or long.
MASK_CACHE_CHARACTERS = 64 * 1024
# Each entry is (compiled mask, characters of its text).
_compiled_masks: LRUCache[str, tuple[Any, int]] = LRUCache(
    maxsize=MASK_CACHE_CHARACTERS, getsizeof=lambda entry: entry[1]
)
# masks x values in the event: one search visits every value at worst (about 10 us each).
MAX_MASK_WORK = 20_000


# Not frozen: one is made per sendEvent, and a frozen dataclass sets each field through
# object.__setattr__. Nothing changes one once parsed.
@dataclass(slots=True)
class SendEventCommand:
    event: dict[str, Any]
    user_id: str
    endpoint_id: str | None
    organization_id: str | None
    qos: int  # 1 = at least once, 0 = best effort
    masks: tuple[Any, ...]  # (concrete path, length) of each masked string in `event`


def parse_send_event(body: Mapping[str, Any]) -> SendEventCommand:
    """Validate a SendEventToUserWebCommand. Raises InvalidInput naming the field."""
    event = body.get("event")
    if not isinstance(event, dict):
        raise InvalidInput("event must be a JSON object", "event")
    validate_event(event)
    user_id = body.get("userId")
    if not isinstance(user_id, str) or not user_id:
        raise InvalidInput("userId is required and must be a non-empty string", "userId")
    endpoint_id = body.get("userEndpointId")
    if endpoint_id is not None:
        endpoint_id = require_endpoint_id(endpoint_id)
    organization_id = body.get("organizationId")
    if organization_id is not None and (not isinstance(organization_id, str) or not organization_id):
        raise InvalidInput("organizationId must be a non-empty string", "organizationId")
    return SendEventCommand(
        event=event,
        user_id=user_id,
        endpoint_id=endpoint_id,
        organization_id=organization_id,
        qos=_qos(body.get("qos")),
        masks=compile_masks(body.get("masks"), event),
    )


def validate_event(event: Mapping[str, Any]) -> None:
    event_type = event.get("type")
    if not isinstance(event_type, str) or not EVENT_TYPE.fullmatch(event_type):
        raise InvalidInput(
            "event.type must be CamelCase with a capital first letter, a noun and a verb, "
            "ending in 'Event' (e.g. CallCreatedEvent)",
            "event.type",
        )
    timestamp = event.get("timestamp")
    if not isinstance(timestamp, str) or not _is_instant(timestamp):
        raise InvalidInput(
            "event.timestamp must be an ISO-8601 instant such as 2011-12-03T10:15:30Z", "event.timestamp"
        )


def _is_instant(text: str) -> bool:
    return EVENT_TIMESTAMP.fullmatch(text) is not None and _is_date(text[:10])


def _is_date(text: str) -> bool:
    known = _KNOWN_DATES.get(text)
    if known is None:
        try:
            date.fromisoformat(text)
            known = True
        except ValueError:
            known = False
        if len(_KNOWN_DATES) >= _MAX_KNOWN_DATES:
            _KNOWN_DATES.clear()
        _KNOWN_DATES[text] = known
    return known


def _qos(value: object) -> int:
    """1 is at least once; 0, absent or any other integer is best effort, as the spec says."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput("qos must be an integer", "qos")
    return 1 if value == 1 else 0


def compile_masks(masks: object, event: Mapping[str, Any]) -> tuple[Any, ...]:
    """Parse each mask, check that it only selects, and that all it selects in `event` are strings.

    Returns the concrete paths of every masked value, so that `masked` needs no second search.
    """
    if masks is None:
        return ()
    if not isinstance(masks, list):
        raise InvalidInput("masks must be a list of JSONPath strings", "masks")
    if len(masks) > MAX_MASKS:
        raise InvalidInput(f"at most {MAX_MASKS} masks are allowed", "masks")
    if masks and len(masks) * _size(event) > MAX_MASK_WORK:
        # Each mask walks the event on the event loop; cap the walk so one request
        # cannot stall every connection.
        raise InvalidInput(
            f"the masks would search too much: masks x event values must stay under {MAX_MASK_WORK}", "masks"
        )
    for index, mask in enumerate(masks):
        _check_mask_text(mask, f"masks[{index}]")
    if sum(len(mask) for mask in masks) > MAX_MASKS_CHARACTERS:
        raise InvalidInput(f"the masks together may have at most {MAX_MASKS_CHARACTERS} characters", "masks")
    paths = []
    for index, mask in enumerate(masks):
        field = f"masks[{index}]"
        expression = _compile(mask, field)
        for match in expression.find(event):
            if not isinstance(match.value, str):
                raise InvalidInput(
                    f"{field} matches {match.full_path} whose value is not a string; masked fields must be strings",
                    field,
                )
            paths.append((match.full_path, len(match.value)))
    return tuple(paths)


def _check_mask_text(mask: object, field: str) -> None:
    """Refuse, before parsing, a mask that would cost too much to parse or to keep."""
    if not isinstance(mask, str) or not mask:
        raise InvalidInput(f"{field} must be a non-empty JSONPath string", field)
    if len(mask) > MAX_MASK_CHARACTERS:
        raise InvalidInput(f"{field} may have at most {MAX_MASK_CHARACTERS} characters", field)
    # Every step begins with '.' or '[' (or is a filter term joined by && / ||): an upper
    # bound on the steps that keeps nested masks away from the recursive parser and walkers.
    if mask.count(".") + mask.count("[") + mask.count("&&") + mask.count("||") > MAX_MASK_STEPS:
        raise InvalidInput(f"{field} may have at most {MAX_MASK_STEPS} steps", field)


def _compile(mask: str, field: str) -> Any:
    cached = _compiled_masks.get(mask)
    if cached is None:
        try:
            expression = parse_jsonpath(mask)
        except RecursionError:
            raise InvalidInput(f"{field} is nested too deeply", field) from None
        except Exception as exc:  # jsonpath-ng raises plain Exceptions from its lexer and parser
            raise InvalidInput(f"{field} is not a valid JSONPath expression: {exc}", field) from None
        if not _only_selects(expression):
            # Functions (`sub`, `len`, `str`...), `parent`, `where` and arithmetic compute
            # values instead of naming places in the event, so masking them would hide nothing.
            raise InvalidInput(f"{field} may only select fields, indexes, slices, wildcards and filters", field)
        if _runs_a_regex(expression):
            # `=~` and `sub` run the caller's regular expression on the event loop: one
            # catastrophic pattern (`(a+)+$`) would freeze every connection for seconds.
            raise InvalidInput(f"{field} may not use regular expressions (=~ or sub)", field)
        cached = _compiled_masks[mask] = (expression, len(mask))
    return cached[0]


def _only_selects(node: Any) -> bool:
    stack = [node]
    while stack:
        step = stack.pop()
        if type(step) in (Child, Descendants):
            stack += (step.left, step.right)
        elif type(step) not in _SELECTING_STEPS:
            return False
    return True


def _nodes(expression: Any) -> list[Any]:
    """Every node of a parsed mask, filter terms included, walked without recursion."""
    found, stack = [], [expression]
    while stack:
        node = stack.pop()
        found.append(node)
        for value in vars(node).values() if hasattr(node, "__dict__") else ():
            if isinstance(value, JSONPath):
                stack.append(value)
            elif isinstance(value, list):
                stack.extend(item for item in value if isinstance(item, JSONPath))
    return found


def _runs_a_regex(expression: Any) -> bool:
    return any(
        isinstance(node, Sub) or (isinstance(node, Expression) and node.op == "=~")
        for node in _nodes(expression)
    )


def _size(value: Any) -> int:
    """How many values `value` holds, itself included (what a `$..` search visits)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def masked(event: Mapping[str, Any], masks: Sequence[Any]) -> Mapping[str, Any]:
    """A copy of `event` with each masked string replaced by '*' of the same length."""
    if not masks:
        return event  # nothing to hide, so nothing to copy
    result = copy.deepcopy(dict(event))
    for path, length in masks:
        path.update(result, "*" * length)
    return result
