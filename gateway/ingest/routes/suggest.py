"""Proposing `[devices]` and `[[routes]]` from what publishers actually send.

Recognises the topic shapes of zigbee2mqtt, Tasmota, ESPHome and Shelly Gen1/Gen2, then
falls back to one route per topic for anything else that carries numbers. The output is a
starting point, valid TOML that `check-config` accepts: device ids are 0 and datastream ids
are placeholders numbered from 1, each marked for the operator to replace. A route whose
devices were seen sending more points than the daily quota allows gets `sample = "fit"`
(gateway/sampling.py), with the rate that was observed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from gateway.sampling import DEFAULT_DAILY_LIMIT

MAX_TOPICS = 5000
# A topic's rate is estimated from at least this many live messages.
MIN_RATE_MESSAGES = 3
# Depth of nested keys offered as fields (`params.switch:0.apower` is 3).
MAX_FIELD_DEPTH = 3
_SWITCH_WORDS = {"on", "off", "true", "false"}
_SKIP_TOPIC_ENDINGS = ("/availability", "/LWT", "/online", "/status", "/set", "/get")


@dataclass
class Observed:
    """The last payload seen on each topic (bounded), in first-seen order, and when each
    topic's live messages came (retained replays say nothing of a rate)."""

    messages: dict[str, bytes] = field(default_factory=dict)
    # topic -> (live messages, first and last seen, seconds)
    live: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    def add(
        self, topic: str, payload: bytes, *, retained: bool = False, at_s: float | None = None
    ) -> None:
        if topic in self.messages or len(self.messages) < MAX_TOPICS:
            self.messages[topic] = payload
            if not retained:
                now = time.monotonic() if at_s is None else at_s
                count, first, _ = self.live.get(topic, (0, now, now))
                self.live[topic] = (count + 1, first, now)

    def per_day(self, topic: str) -> float:
        """Messages per day on the topic, from its live messages (0: too few to tell)."""
        count, first, last = self.live.get(topic, (0, 0.0, 0.0))
        if count < MIN_RATE_MESSAGES or last <= first:
            return 0.0
        return (count - 1) * 86_400 / (last - first)


@dataclass
class _Route:
    kind: str
    lines: dict[str, str]
    devices: list[str] = field(default_factory=list)
    # datastream placeholders are given out when the route is printed
    fields: list[str] = field(default_factory=list)
    streams: list[str] = field(default_factory=list)
    # readings per day seen per device (message rate x the values each held)
    per_day: dict[str, float] = field(default_factory=dict)


def _document(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _is_reading(value: Any) -> bool:
    if isinstance(value, bool | int | float):
        return True
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in _SWITCH_WORDS:
            return True
        try:
            float(text)
        except ValueError:
            return False
        return True
    return False


def _numeric_paths(document: Any, prefix: str = "", depth: int = 1) -> Iterator[str]:
    if not isinstance(document, dict) or depth > MAX_FIELD_DEPTH:
        return
    for key, value in document.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _numeric_paths(value, path + ".", depth + 1)
        elif _is_reading(value):
            yield path


def _add_unique(target: list[str], items: Any) -> None:
    for item in items:
        if item not in target:
            target.append(item)


class _Suggester:
    def __init__(self) -> None:
        self.routes: dict[str, _Route] = {}
        self.rate = 0.0  # messages per day of the topic being seen

    def _seen(self, found: _Route, device: str, values: int) -> None:
        found.per_day[device] = found.per_day.get(device, 0.0) + self.rate * values

    def route(self, key: str, kind: str, **lines: str) -> _Route:
        if key not in self.routes:
            self.routes[key] = _Route(kind, {k: json.dumps(v) for k, v in lines.items()})
        return self.routes[key]

    def see(self, topic: str, payload: bytes) -> None:
        levels = topic.split("/")
        if topic.startswith("$") or topic.endswith(_SKIP_TOPIC_ENDINGS):
            return
        document = _document(payload)
        text = payload.decode("utf-8", "replace").strip()
        if levels[0] == "zigbee2mqtt" and len(levels) == 2 and isinstance(document, dict):
            if levels[1] != "bridge":
                self._with_fields(
                    "zigbee2mqtt/{device}",
                    "zigbee2mqtt",
                    levels[1],
                    document,
                    timestamp="last_seen" if "last_seen" in document else None,
                )
            return
        if len(levels) == 3 and levels[0] == "tele" and levels[2] == "SENSOR":
            if isinstance(document, dict):
                self._with_fields(
                    "tele/{device}/SENSOR",
                    "Tasmota",
                    levels[1],
                    document,
                    timestamp="Time" if "Time" in document else None,
                )
            return
        if len(levels) == 4 and levels[1] in ("sensor", "binary_sensor") and levels[3] == "state":
            if _is_reading(text) or text.lower() in ("nan", "unavailable"):
                template = f"{{device}}/{levels[1]}/{{stream}}/state"
                found = self.route(template, "ESPHome", topic=template)
                _add_unique(found.devices, [levels[0]])
                _add_unique(found.streams, [levels[2]])
                self._seen(found, levels[0], 1)
            return
        if len(levels) == 3 and levels[1:] == ["events", "rpc"] and isinstance(document, dict):
            params = document.get("params")
            if isinstance(document.get("src"), str) and isinstance(params, dict):
                paths = [p for p in _numeric_paths(params, "params.") if p != "params.ts"]
                found = self.route(
                    "+/events/rpc",
                    "Shelly Gen2",
                    topic="+/events/rpc",
                    device_field="src",
                    timestamp="params.ts",
                )
                _add_unique(found.devices, [document["src"]])
                _add_unique(found.fields, paths)
                self._seen(found, document["src"], len(paths))
            return
        if levels[0] == "shellies" and len(levels) >= 3 and _is_reading(text):
            template = "/".join(["shellies", "{device}", *levels[2:]])
            found = self.route(template, "Shelly Gen1", topic=template)
            _add_unique(found.devices, [levels[1]])
            found.streams = ["-"]
            self._seen(found, levels[1], 1)
            return
        if isinstance(document, dict):
            paths = list(_numeric_paths(document))
            if paths:
                found = self.route(topic, "custom JSON", topic=topic)
                found.lines["device_id"] = "0"
                _add_unique(found.fields, paths)
                self._seen(found, topic, len(paths))
        elif _is_reading(text):
            found = self.route(topic, "plain value", topic=topic)
            found.lines["device_id"] = "0"
            found.streams = ["-"]
            self._seen(found, topic, 1)

    def _with_fields(
        self,
        template: str,
        kind: str,
        device: str,
        document: dict[str, Any],
        *,
        timestamp: str | None,
    ) -> None:
        paths = [p for p in _numeric_paths(document) if p != timestamp]
        lines = {"topic": template} | ({"timestamp": timestamp} if timestamp else {})
        found = self.route(template, kind, **lines)
        if timestamp and "timestamp" not in found.lines:
            found.lines["timestamp"] = json.dumps(timestamp)
        _add_unique(found.devices, [device])
        _add_unique(found.fields, paths)
        self._seen(found, device, len(paths))


def _sample_line(found: _Route, daily_limit: int) -> str | None:
    """`sample = "fit"` for a route whose busiest device was seen above the daily quota."""
    if not found.per_day:
        return None
    device, per_day = max(found.per_day.items(), key=lambda item: item[1])
    if per_day <= daily_limit:
        return None
    return (
        f'sample = "fit"  # {device}: {per_day:,.0f} points/day seen, over the quota of '
        f"{daily_limit:,}; fit sends one mean per window per datastream (or choose "
        'sample = { every = "60s" } or { deadband = ... })'
    )


def suggest_config(observed: Observed, daily_limit: int = DEFAULT_DAILY_LIMIT) -> str:
    """TOML text: a [devices] table and one [[routes]] entry per recognised shape."""
    suggester = _Suggester()
    for topic, payload in observed.messages.items():
        suggester.rate = observed.per_day(topic)
        suggester.see(topic, payload)
    devices: list[str] = []
    for found in suggester.routes.values():
        _add_unique(devices, found.devices)
    out = [
        f"# Suggested by `blynk-gateway routes suggest` from {len(observed.messages)} topics.",
        "# Replace each 0 with the Blynk device id and each datastream number with your",
        "# template's datastream id, then check with `blynk-gateway routes test`.",
        "",
    ]
    if devices:
        out.append("[devices]")
        out += [f"{json.dumps(name)} = 0  # TODO: Blynk device id" for name in devices]
        out.append("")
    next_id = 1
    for found in suggester.routes.values():
        if not (found.fields or found.streams):
            continue
        out.append(f"# {found.kind}" + (f": {', '.join(found.devices)}" if found.devices else ""))
        out.append("[[routes]]")
        out += [f"{key} = {value}" for key, value in found.lines.items() if key != "timestamp"]
        if found.fields:
            pairs = []
            for path in found.fields:
                pairs.append(f"{json.dumps(path)} = {next_id}")
                next_id += 1
            out.append("fields = { " + ", ".join(pairs) + " }  # TODO: datastream ids")
        elif found.streams == ["-"]:
            out.append(f"datastream_id = {next_id}  # TODO: datastream id")
            next_id += 1
        else:
            pairs = []
            for name in found.streams:
                pairs.append(f"{json.dumps(name)} = {next_id}")
                next_id += 1
            out.append("streams = { " + ", ".join(pairs) + " }  # TODO: datastream ids")
        if "timestamp" in found.lines:
            out.append(f"timestamp = {found.lines['timestamp']}")
            if found.kind == "Tasmota":
                out.append(
                    'timezone = "+01:00"  # TODO: the device\'s zone (stock Tasmota: +01:00)'
                )
        sample = _sample_line(found, daily_limit)
        if sample is not None:
            out.append(sample)
        out.append("")
    return "\n".join(out)
