"""The MQTT topic matcher (MQTT 3.1.1 section 4.7), the one every topic rule uses (unit tests of the core)."""

from __future__ import annotations

import pytest

from endpoint_core.topics import topic_matches


@pytest.mark.parametrize(("topic_filter", "topic"), [
    ("users/endpoints/e1", "users/endpoints/e1"),
    ("users/endpoints/+", "users/endpoints/e1"),
    ("users/+/e1", "users/endpoints/e1"),
    ("+/+/+", "users/endpoints/e1"),
    ("users/#", "users/endpoints/e1"),
    ("users/endpoints/#", "users/endpoints/e1"),
    ("#", "users/endpoints/e1"),
    ("users/#", "users"),  # '#' also matches the parent level (4.7.1.2)
    ("users/+", "users/"),  # an empty level is a level
    ("+/a", "/a"),  # a leading '/' makes an empty first level
    ("a//b", "a//b"),
    ("a/+/b", "a//b"),
    ("$SYS/#", "$SYS/broker/uptime"),  # a filter naming the '$' level explicitly matches it
    ("$SYS/+/uptime", "$SYS/broker/uptime"),
])
def test_matches(topic_filter: str, topic: str) -> None:
    assert topic_matches(topic_filter, topic)


@pytest.mark.parametrize(("topic_filter", "topic"), [
    ("users/endpoints/e1", "users/endpoints/e2"),
    ("users/endpoints/e1", "Users/endpoints/e1"),  # case matters
    ("users/endpoints", "users/endpoints/e1"),  # fewer levels
    ("users/endpoints/e1/x", "users/endpoints/e1"),  # more levels
    ("users/endpoints/+", "users/endpoints/e1/x"),  # '+' is exactly one level
    ("users/endpoints/+", "users/endpoints"),
    ("+", "a/b"),
    ("users/#", "user/u/e1"),
    ("/a", "a"),
    ("a/+/b", "a/b"),
    # Wildcards at the first level never match topics starting with '$' (4.7.2).
    ("#", "$SYS/broker/uptime"),
    ("+/broker/uptime", "$SYS/broker/uptime"),
    ("+/#", "$internal/x"),
    ("#", "$"),
])
def test_does_not_match(topic_filter: str, topic: str) -> None:
    assert not topic_matches(topic_filter, topic)


def test_a_dollar_level_is_only_special_first() -> None:
    assert topic_matches("users/+/e1", "users/$x/e1")
    assert topic_matches("users/#", "users/$x/e1")
