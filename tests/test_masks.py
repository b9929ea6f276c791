"""Mask rules in the core: what a mask may cost, and that no caller's regex ever runs."""

from __future__ import annotations

from typing import Any

import pytest

from endpoint_core import events
from endpoint_core.errors import InvalidInput
from endpoint_core.events import (
    MASK_CACHE_CHARACTERS,
    MAX_MASK_CHARACTERS,
    MAX_MASK_STEPS,
    MAX_MASKS_CHARACTERS,
    compile_masks,
)

EVENT: dict[str, Any] = {"type": "CallCreatedEvent", "timestamp": "2011-12-03T10:15:30Z",
                         "x": [{"s": "a" * 25 + "!"}], "a": {"a": "secret"}}


def refused(masks: object, event: dict[str, Any] = EVENT) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        compile_masks(masks, event)
    return caught.value


@pytest.mark.parametrize("mask", [
    '$.x[?(@.s =~ "(a+)+$")].s',
    '$.x[?(@.n == 1 && @.s =~ "(a+)+$")].s',
    '$.x[?(@.n == 1 || @.s =~ "(a+)+$")].s',
    '$.x[?(@.s.`sub(/(a+)+$/, b)` == "b")].s',
])
def test_a_mask_may_not_run_a_regular_expression(mask: str) -> None:
    error = refused(["$.a.a", mask])
    assert error.field == "masks[1]"
    assert "regular expression" in error.detail


def test_filters_without_regular_expressions_still_work() -> None:
    paths = compile_masks(['$.x[?(@.s == "' + "a" * 25 + '!")].s'], EVENT)
    assert [str(path) for path, _ in paths] == ["x.[0].s"]


def test_a_mask_longer_than_the_limit_is_refused_before_parsing() -> None:
    mask = "$." + "a" * MAX_MASK_CHARACTERS
    assert refused([mask]).field == "masks[0]"
    compile_masks(["$." + "a" * (MAX_MASK_CHARACTERS - 2)], EVENT)  # the limit itself is fine


def test_the_masks_together_have_a_character_budget() -> None:
    each = "$." + "a" * (MAX_MASK_CHARACTERS - 2)
    masks = [each] * (MAX_MASKS_CHARACTERS // MAX_MASK_CHARACTERS + 1)
    assert refused(masks).field == "masks"


def test_a_mask_with_too_many_steps_is_refused() -> None:
    assert refused(["$" + ".a" * (MAX_MASK_STEPS + 1)]).field == "masks[0]"
    compile_masks(["$" + ".a" * (MAX_MASK_STEPS - 1)], EVENT)
    assert refused(["$..a" + "..a" * 16]).field == "masks[0]"


def test_a_deeply_nested_mask_is_invalid_input_not_a_crash() -> None:
    error = refused(["$" + ".a" * 3000])
    assert error.field == "masks[0]"


def test_the_compiled_mask_cache_is_bounded_by_characters() -> None:
    cache = events._compiled_masks
    cache.clear()
    length = MAX_MASK_CHARACTERS - 8
    for n in range(2 * MASK_CACHE_CHARACTERS // length + 10):
        compile_masks([f"$.k{n:06d}" + "b" * (length - 9)], EVENT)
    assert sum(len(mask) for mask in cache) <= MASK_CACHE_CHARACTERS
    assert len(cache) >= MASK_CACHE_CHARACTERS // length - 1  # still caches what fits
