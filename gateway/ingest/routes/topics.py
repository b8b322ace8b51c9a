"""MQTT topic filters, with `{device}` and `{stream}` levels that capture a name.

A template level matches like `+` (one level), so the broker subscription is the filter
with each template replaced by `+`; the captured names are read by level index, which is
cheaper than a regex and cannot be fooled by names containing regex syntax.
"""

from __future__ import annotations

from dataclasses import dataclass

DEVICE_LEVEL = "{device}"
STREAM_LEVEL = "{stream}"


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest); `$` topics never match wildcards."""
    if topic_filter == topic:
        return True
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[index]:
            return False
    return len(filter_levels) == len(topic_levels)


@dataclass(frozen=True, slots=True)
class TopicTemplate:
    """A route's `topic`: the broker filter it subscribes, and where its names sit."""

    template: str
    subscription: str
    device_level: int | None
    stream_level: int | None

    @classmethod
    def parse(cls, template: str) -> TopicTemplate:
        levels = template.split("/")
        device_level = levels.index(DEVICE_LEVEL) if DEVICE_LEVEL in levels else None
        stream_level = levels.index(STREAM_LEVEL) if STREAM_LEVEL in levels else None
        subscription = "/".join(
            "+" if level in (DEVICE_LEVEL, STREAM_LEVEL) else level for level in levels
        )
        return cls(template, subscription, device_level, stream_level)

    def capture(self, topic: str) -> tuple[str | None, str | None] | None:
        """(device name, stream name) if the topic matches, else None."""
        if not topic_matches(self.subscription, topic):
            return None
        if self.device_level is None and self.stream_level is None:
            return None, None
        levels = topic.split("/")
        device = levels[self.device_level] if self.device_level is not None else None
        stream = levels[self.stream_level] if self.stream_level is not None else None
        return device, stream
