"""MQTT topic filters: the one matcher every topic rule uses."""

from __future__ import annotations


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches `topic_filter` (MQTT 3.1.1, 4.7): `+` is one level, `#` the rest.

    Topics starting with `$` are never matched by a filter starting with a wildcard (4.7.2).
    """
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels) or level not in ("+", topic_levels[index]):
            return False
    return len(filter_levels) == len(topic_levels)
