"""Sampling: how a stream's readings are thinned to fit the cloud's daily quota. Pure, no I/O.

Blynk takes 10,000 points per device per day; real sensors send far more. A route (or one
field of it) may say `sample = { every = "60s", aggregate = "mean" }` (one point per
window), `sample = { deadband = 0.5, heartbeat = "15m" }` (only changes, and a keep-alive),
or `sample = "fit"` (the smallest window from a fixed ladder that fits the quota).

Every part uses this module and none of them imports another for it: `config` validates
the settings, ingest applies the deadband and refuses readings for windows already sent,
the store cuts a stream's buffered readings into windows and aggregates them for the
flush loop, and `status` and `routes test` explain what is in force.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from gateway.config import FieldSettings, RouteSettings

DAY_MS = 86_400_000
# cloud.daily_points_limit's default: the seed document's 10,000 points per device per day.
DEFAULT_DAILY_LIMIT = 10_000
# A window closes once the clock is this far past its end and no reading for it came for
# as long. Covers the path publisher → broker → gateway → commit (milliseconds to a second)
# and device clocks a few seconds off NTP, while a live window's point still reaches the
# cloud within seconds of the window's end (README "Sampling").
DEFAULT_GRACE_MS = 5_000
MAX_GRACE_MS = 3_600_000
MAX_WINDOW_MS = DAY_MS
AGGREGATES = ("mean", "min", "max", "first", "last", "sum", "count")
Aggregate = Literal["mean", "min", "max", "first", "last", "sum", "count"]
# These compute with the values, so they need numbers.
NUMERIC_AGGREGATES = frozenset({"mean", "min", "max", "sum"})
# Datastream types whose values are not numbers (None, undeclared, counts as numeric).
NON_NUMERIC_TYPES = frozenset({"string", "enum", "boolean", "location"})
# `sample = "fit"`: the smallest of these windows (seconds) whose points, for every
# datastream the device can get, take at most FIT_SHARE of its daily limit.
FIT_LADDER_S = (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
FIT_SHARE = 0.9

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h|d)?\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "min": 60_000, "h": 3_600_000, "d": DAY_MS}


def parse_duration_ms(value: Any) -> int:
    """`"500ms"`, `"10s"`, `"15m"`, `"1h"`, `"1d"`, or a number of seconds → milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f'a duration like "10s", "15m" or seconds, got {value!r}')
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"a duration must be a finite number of seconds >= 0, got {value!r}")
        return round(seconds * 1000)
    if isinstance(value, str):
        found = _DURATION.match(value)
        if found is not None:
            return round(float(found.group(1)) * _UNIT_MS[found.group(2) or "s"])
    raise ValueError(
        f'a duration like "500ms", "10s", "15m", "1h", or seconds as a number, got {value!r}'
    )


def format_duration_ms(ms: int) -> str:
    """The shortest exact spelling: 60000 → "1m", 1500 → "1500ms" (config syntax)."""
    for unit in ("d", "h", "m", "s"):
        if ms and ms % _UNIT_MS[unit] == 0:
            return f"{ms // _UNIT_MS[unit]}{unit}"
    return f"{ms}ms"


DurationMs = Annotated[int, BeforeValidator(parse_duration_ms)]


def _spec_from_text(raw: Any) -> Any:
    """`sample = "fit"` and `sample = "raw"` are tables with one flag set."""
    if isinstance(raw, str):
        if raw in ("fit", "raw"):
            return {raw: True}
        raise ValueError(
            'must be a table { every, aggregate, grace, deadband, heartbeat }, "fit" or "raw", '
            f"got {raw!r}"
        )
    return raw


class SampleSettings(BaseModel):
    """One `sample` setting, as written (durations in ms). Exactly one kind is chosen:
    windows (`every`), a deadband (`deadband`), `fit`, or `raw` (a field exempt from its
    route's rule)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    every: DurationMs | None = None
    aggregate: Aggregate | None = None
    grace: DurationMs | None = None
    deadband: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    heartbeat: DurationMs | None = None
    fit: bool = False
    raw: bool = False

    @field_validator("every")
    @classmethod
    def _window_length(cls, every: int | None) -> int | None:
        if every is not None and not 0 < every <= MAX_WINDOW_MS:
            raise ValueError(f"must be more than 0 and at most 1d, got {every} ms")
        return every

    @field_validator("grace")
    @classmethod
    def _grace_length(cls, grace: int | None) -> int | None:
        if grace is not None and grace > MAX_GRACE_MS:
            raise ValueError(f"must be at most 1h, got {grace} ms")
        return grace

    @field_validator("heartbeat")
    @classmethod
    def _heartbeat_length(cls, heartbeat: int | None) -> int | None:
        if heartbeat is not None and heartbeat <= 0:
            raise ValueError("must be more than 0")
        return heartbeat

    @model_validator(mode="after")
    def _one_kind(self) -> SampleSettings:
        if self.heartbeat is not None and self.deadband is None:
            raise ValueError("heartbeat needs deadband (deadband = 0 keeps every change)")
        kinds = [
            name
            for name, chosen in (
                ("every", self.every is not None),
                ("deadband", self.deadband is not None),
                ('"fit"', self.fit),
                ('"raw"', self.raw),
            )
            if chosen
        ]
        if len(kinds) > 1:
            raise ValueError(
                f"{' and '.join(kinds)} do not combine: choose windows (every), a deadband, "
                '"fit" or "raw"; a window already sends one point, so a deadband on top '
                "would only hide some of them"
            )
        if not kinds:
            raise ValueError(
                'say how to sample: every = "60s" (windows), deadband = 0.5 (changes only), '
                '"fit" or "raw"'
            )
        windowed = self.every is not None or self.fit
        for key in ("aggregate", "grace"):
            if getattr(self, key) is not None and not windowed:
                raise ValueError(f'{key} applies to windows: give every, or use "fit"')
        return self


SampleSpec = Annotated[SampleSettings, BeforeValidator(_spec_from_text)]


# --------------------------------------------------------------------------- rules in force


@dataclass(frozen=True, slots=True)
class WindowRule:
    """One point per `window_ms` of reading time, stamped with the window's start.

    `whole`: the datastream takes integers only, so a mean is rounded.
    """

    window_ms: int
    aggregate: str
    grace_ms: int = DEFAULT_GRACE_MS
    whole: bool = False

    def start_of(self, ts_ms: int) -> int:
        return window_start(ts_ms, self.window_ms)

    def describe(self) -> str:
        return f"{self.aggregate} of {format_duration_ms(self.window_ms)} windows"


@dataclass(frozen=True, slots=True)
class DeadbandRule:
    """Only readings that moved more than `deadband`, or came `heartbeat_ms` after the
    last kept one (reading times)."""

    deadband: float
    heartbeat_ms: int | None = None

    def describe(self) -> str:
        text = f"deadband {self.deadband:g}"
        if self.heartbeat_ms is not None:
            text += f", heartbeat {format_duration_ms(self.heartbeat_ms)}"
        return text


@dataclass(frozen=True, slots=True)
class FitRule:
    """`sample = "fit"`: a window rule whose window depends on the device (`fit_window_ms`)."""

    aggregate: str
    grace_ms: int = DEFAULT_GRACE_MS
    whole: bool = False

    def for_window(self, window_ms: int) -> WindowRule:
        return WindowRule(window_ms, self.aggregate, self.grace_ms, self.whole)


Rule = WindowRule | DeadbandRule


def window_start(ts_ms: int, window_ms: int) -> int:
    """Windows are aligned to the Unix epoch: `t` belongs to the window at `t - t mod every`."""
    return ts_ms - ts_ms % window_ms


def fit_window_ms(datastreams: int, daily_limit: int) -> int | None:
    """The smallest ladder step E with (86400 / E) * S <= 0.9 * limit; None if even 1 h is
    too short."""
    budget = FIT_SHARE * daily_limit
    for step_s in FIT_LADDER_S:
        if 86_400 / step_s * max(1, datastreams) <= budget:
            return step_s * 1000
    return None


def spec_rule(spec: SampleSettings, value_type: str | None) -> Rule | FitRule | None:
    """What a written `sample` means for a datastream of `value_type`; None for "raw"."""
    if spec.raw:
        return None
    if spec.deadband is not None:
        return DeadbandRule(spec.deadband, spec.heartbeat)
    numeric = value_type not in NON_NUMERIC_TYPES
    aggregate = spec.aggregate or ("mean" if numeric else "last")
    whole = value_type in ("integer", "enum")
    grace_ms = DEFAULT_GRACE_MS if spec.grace is None else spec.grace
    if spec.fit:
        return FitRule(aggregate, grace_ms, whole)
    assert spec.every is not None
    return WindowRule(spec.every, aggregate, grace_ms, whole)


def spec_problem(spec: SampleSettings, value_type: str | None) -> str | None:
    """Why a `sample` cannot apply to a datastream of `value_type`, or None."""
    if value_type not in NON_NUMERIC_TYPES:
        return None
    if spec.aggregate in NUMERIC_AGGREGATES:
        return (
            f'aggregate = "{spec.aggregate}" needs a numeric datastream, this one is '
            f'type = "{value_type}" (use first, last or count)'
        )
    if spec.deadband is not None and spec.deadband > 0:
        return (
            f"deadband = {spec.deadband:g} needs a numeric datastream, this one is "
            f'type = "{value_type}" (deadband = 0 keeps every change)'
        )
    return None


# --------------------------------------------------------------------------- deadband


def as_number(value_json: str) -> float | None:
    """A stored value's number, or None for text, booleans and locations."""
    first = value_json[:1]
    if not (first.isdigit() or first == "-"):
        return None
    try:
        return float(value_json)
    except ValueError:
        return None


def deadband_keeps(
    rule: DeadbandRule, last: tuple[int, str] | None, ts_ms: int, value: str
) -> bool:
    """Keep a reading if it is the stream's first, if it differs from the last kept value
    by more than the deadband (text: differs at all), or if its time is `heartbeat` or
    more after the last kept reading's time."""
    if last is None:
        return True
    last_ts, last_value = last
    if rule.heartbeat_ms is not None and ts_ms - last_ts >= rule.heartbeat_ms:
        return True
    number, last_number = as_number(value), as_number(last_value)
    if number is None or last_number is None:
        return value != last_value
    return abs(number - last_number) > rule.deadband


def deadband_verdict(
    rule: DeadbandRule, last: tuple[int, str] | None, ts_ms: int, value: str
) -> tuple[bool, str]:
    """`deadband_keeps` with its reason, for people (`routes test`)."""
    keep = deadband_keeps(rule, last, ts_ms, value)
    if last is None:
        return keep, "kept: the stream's first reading (no earlier kept reading is known)"
    last_ts, last_value = last
    since = format_duration_ms(abs(ts_ms - last_ts))
    heartbeat = rule.heartbeat_ms
    if heartbeat is not None and ts_ms - last_ts >= heartbeat:
        every = format_duration_ms(heartbeat)
        return keep, f"kept: {since} after the last kept reading, the heartbeat is {every}"
    number, last_number = as_number(value), as_number(last_value)
    if number is None or last_number is None:
        moved = "differs from" if keep else "equals"
        return keep, f"{'kept' if keep else 'suppressed'}: {moved} the last kept value {last_value}"
    change = f"{abs(number - last_number):g} from the last kept value {last_value}"
    if keep:
        return keep, f"kept: moved {change}, more than the deadband {rule.deadband:g}"
    return keep, f"suppressed: moved {change}, not more than the deadband {rule.deadband:g}"


# --------------------------------------------------------------------------- aggregation


class Aggregator:
    """Folds one window's values (JSON text, in reading-time order) into its point.

    Deterministic for the same rows in the same order, so a window re-sent after a crash is
    the same point. Sums are compensated (Neumaier) and exact for integers. A numeric
    aggregate skips values that are not numbers (ingest refuses them; they can only come
    from a rule changed under a backlog); a window with none sends its last value.
    """

    __slots__ = (
        "_best",
        "_best_text",
        "_comp",
        "_int_total",
        "_total",
        "count",
        "first",
        "kind",
        "last",
        "numbers",
        "whole",
    )

    def __init__(self, kind: str, whole: bool = False) -> None:
        self.kind = kind
        self.whole = whole
        self.count = 0
        self.numbers = 0
        self.first = ""
        self.last = ""
        self._total = 0.0
        self._comp = 0.0
        self._int_total: int | None = 0
        self._best = 0.0
        self._best_text = ""

    def add(self, value_json: str) -> None:
        if not self.count:
            self.first = value_json
        self.count += 1
        self.last = value_json
        if self.kind not in NUMERIC_AGGREGATES:
            return
        number = as_number(value_json)
        if number is None:
            return
        self.numbers += 1
        if self.kind in ("min", "max"):
            better = number < self._best if self.kind == "min" else number > self._best
            if self.numbers == 1 or better:
                self._best, self._best_text = number, value_json
            return
        if self._int_total is not None and value_json.lstrip("-").isdigit():
            self._int_total += int(value_json)
        else:
            self._int_total = None
        total = self._total + number
        if abs(self._total) >= abs(number):
            self._comp += (self._total - total) + number
        else:
            self._comp += (number - total) + self._total
        self._total = total

    def result(self) -> str:
        """The window's point as JSON text."""
        kind = self.kind
        if kind == "count":
            return str(self.count)
        if kind == "first":
            return self.first
        if kind == "last" or not self.numbers:
            return self.last
        if kind in ("min", "max"):
            return self._best_text
        if kind == "sum":
            if self._int_total is not None:
                return str(self._int_total)
            return _float_json(self._total + self._comp)
        if self._int_total is not None and self._int_total % self.numbers == 0:
            return str(self._int_total // self.numbers)
        mean = (self._total + self._comp) / self.numbers
        if self.whole:
            return str(math.floor(mean + 0.5))
        return _float_json(mean)


def _float_json(number: float) -> str:
    if math.isfinite(number):
        return repr(number)
    return "null"  # pragma: no cover - finite inputs keep a finite sum


def aggregate_windows(
    rows: Iterable[tuple[int, str]], rule: WindowRule
) -> list[tuple[int, str, int]]:
    """(window start, point value, readings folded) per window, for rows in time order."""
    points: list[tuple[int, str, int]] = []
    current: Aggregator | None = None
    current_start = 0
    for ts_ms, value in rows:
        start = window_start(ts_ms, rule.window_ms)
        if current is None or start != current_start:
            if current is not None:
                points.append((current_start, current.result(), current.count))
            current, current_start = Aggregator(rule.aggregate, rule.whole), start
        current.add(value)
    if current is not None:
        points.append((current_start, current.result(), current.count))
    return points


# --------------------------------------------------------------------------- the plan


def route_datastreams(route: RouteSettings) -> dict[int, FieldSettings | None]:
    """The datastreams a route can feed (its fields, streams entries or datastream_id), with
    each one's entry; empty for a `{stream}` route without `streams` (any datastream)."""
    entries: dict[int, FieldSettings | None] = {}
    for entry in (*route.field_map().values(), *route.stream_map().values()):
        entries.setdefault(entry.datastream, entry)
    if route.datastream_id is not None:
        entries.setdefault(route.datastream_id, None)
    return entries


def has_named_device(route: RouteSettings) -> bool:
    return route.device_id is None


def open_stream_route(route: RouteSettings) -> bool:
    """A `{stream}` route without `streams`: the topic level is the datastream id itself."""
    return "{stream}" in route.topic.split("/") and not route.streams


def route_specs(
    route: RouteSettings,
) -> tuple[dict[int, SampleSettings | None], SampleSettings | None]:
    """(datastream → the `sample` written for it, the route's default for the rest)."""
    specs: dict[int, SampleSettings | None] = {}
    for datastream_id, entry in route_datastreams(route).items():
        own = entry.sample if entry is not None else None
        specs[datastream_id] = own if own is not None else route.sample
    return specs, route.sample


@dataclass(frozen=True, slots=True)
class DeviceStreams:
    """The datastreams the configuration can route to a device, and each one's rule
    (`fitted`: those whose window `fit` chose)."""

    device_id: int
    rules: Mapping[int, Rule | None]
    fitted: frozenset[int] = frozenset()

    @property
    def sampled(self) -> bool:
        return any(rule is not None for rule in self.rules.values())


class SamplingPlan:
    """The rules of a configuration, resolved per device where `fit` needs it.

    `fit` counts S, the datastreams every route that can match the device can feed: the
    routes with its `device_id`, and every route that takes the device from a name (a
    `{device}` level or `device_field`) when the device has a name in `[devices]` (or
    numeric ids are on). Counting routes that a device never uses in practice only makes
    its windows longer than needed, never too short for the quota.
    """

    def __init__(
        self,
        routes: Sequence[RouteSettings],
        device_ids: Iterable[int],
        *,
        numeric_ids: bool,
        daily_limit: int,
    ) -> None:
        self.daily_limit = daily_limit
        self._routes = tuple(routes)
        self._named_devices = frozenset(device_ids)
        self._numeric_ids = numeric_ids
        self._fixed: dict[int, set[int]] = {}
        self._named: set[int] = set()
        for route in self._routes:
            datastreams = set(route_datastreams(route))
            if has_named_device(route):
                self._named |= datastreams
            else:
                assert route.device_id is not None
                self._fixed.setdefault(route.device_id, set()).update(datastreams)
        self.active = any(
            spec is not None and not spec.raw
            for route in self._routes
            for spec in (route.sample, *route_specs(route)[0].values())
        )
        self._fit_windows: dict[int, int] = {}

    def reaches_by_name(self, device_id: int) -> bool:
        return self._numeric_ids or device_id in self._named_devices

    def datastreams_of(self, device_id: int) -> set[int]:
        """S's members: what the configuration can route to this device."""
        found = set(self._fixed.get(device_id, ()))
        if self.reaches_by_name(device_id):
            found |= self._named
        return found

    def named_count(self) -> int:
        """S of a device known only by its name (no route of its own)."""
        return len(self._named)

    def fit_window_ms(self, device_id: int) -> int:
        """`fit`'s window for this device (1 h if nothing on the ladder fits)."""
        count = len(self.datastreams_of(device_id))
        window = self._fit_windows.get(count)
        if window is None:
            window = fit_window_ms(count, self.daily_limit) or FIT_LADDER_S[-1] * 1000
            self._fit_windows[count] = window
        return window

    def resolve(self, rule: Rule | FitRule | None, device_id: int) -> Rule | None:
        if isinstance(rule, FitRule):
            return rule.for_window(self.fit_window_ms(device_id))
        return rule

    def device(self, device_id: int) -> DeviceStreams:
        """Every datastream the configuration can route to the device, with its rule (the
        first route in the file that names the datastream decides, as routing does)."""
        rules: dict[int, Rule | None] = {}
        fitted: set[int] = set()
        for route in self._routes:
            if route.device_id is not None and route.device_id != device_id:
                continue
            if route.device_id is None and not self.reaches_by_name(device_id):
                continue
            specs, _ = route_specs(route)
            entries = route_datastreams(route)
            for datastream_id, spec in specs.items():
                if datastream_id in rules:
                    continue
                entry = entries[datastream_id]
                value_type = entry.type if entry is not None else route.type
                compiled = spec_rule(spec, value_type) if spec is not None else None
                rules[datastream_id] = self.resolve(compiled, device_id)
                if isinstance(compiled, FitRule):
                    fitted.add(datastream_id)
        return DeviceStreams(device_id, rules, frozenset(fitted))

    def devices(self) -> list[int]:
        """Devices the configuration names: fixed `device_id`s and `[devices]` entries."""
        return sorted(set(self._fixed) | self._named_devices)


def compile_rules(
    route: RouteSettings,
) -> tuple[dict[int, Rule | FitRule | None], Rule | FitRule | None]:
    """A route's rules for the hot path: (datastream → rule, the rule for any other
    datastream, which only a `{stream}` route without `streams` can produce)."""
    specs, default = route_specs(route)
    entries = route_datastreams(route)
    rules: dict[int, Rule | FitRule | None] = {}
    for datastream_id, spec in specs.items():
        entry = entries[datastream_id]
        value_type = entry.type if entry is not None else route.type
        rules[datastream_id] = spec_rule(spec, value_type) if spec is not None else None
    default_rule = spec_rule(default, None) if default is not None else None
    if default_rule is None:  # nothing to override: a route without rules has no entries
        rules = {datastream_id: rule for datastream_id, rule in rules.items() if rule is not None}
    return rules, default_rule


def _uses_fit(route: RouteSettings) -> bool:
    specs = (route.sample, *route_specs(route)[0].values())
    return any(spec is not None and spec.fit for spec in specs)


def fit_problem(
    routes: Sequence[RouteSettings], device_ids: Iterable[int], *, numeric_ids: bool, limit: int
) -> str | None:
    """Why `sample = "fit"` cannot be planned for this configuration, or None."""
    if not any(_uses_fit(route) for route in routes):
        return None
    for route in routes:
        if open_stream_route(route):
            return (
                f'sample = "fit" counts the datastreams each device can get, but the route '
                f"{route.topic!r} can feed any datastream id: list them in its streams"
            )
    plan = SamplingPlan(routes, device_ids, numeric_ids=numeric_ids, daily_limit=limit)
    counts = {len(plan.datastreams_of(device_id)) for device_id in plan.devices()}
    counts.add(plan.named_count())
    worst = max(counts)
    if fit_window_ms(worst, limit) is None:
        return (
            f'sample = "fit": {worst} datastreams of one device do not fit daily_points_limit '
            f"= {limit} even at 1h windows; give some of them a longer every"
        )
    return None
