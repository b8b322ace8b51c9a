"""`RouteTable`: one MQTT message in, the readings it holds (and what was wrong) out.

Routes are compiled once (paths split, zones resolved, names looked up) and each topic's
answer is cached, because topics repeat forever: per message the work is one dict hit, one
JSON parse and one step per mapped field. Nothing here raises on input: every message ends
as readings, refusals with a stable code, or a reason it maps to nothing (`Outcome`); an
exception nobody foresaw refuses that one message as `internal_error`.

What comes from outside is bounded before it is used: a captured name (`{device}`,
`{stream}`, `device_field`) longer than MAX_NAME_BYTES is `name_too_long`, an id taken from
a name must be a positive signed 64-bit integer (`id_out_of_range`), and the topic cache
is bounded in entries and in (estimated) bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.config import DeviceNames, FieldSettings, RouteSettings, parse_timezone
from gateway.errors import PayloadError
from gateway.ingest.routes.payloads import MISSING, JsonPath, senml_records
from gateway.ingest.routes.stamps import ReceiveStamps
from gateway.ingest.routes.timestamps import MIN_TRUSTED_MS, TimestampReader, untrusted_reason
from gateway.ingest.routes.topics import TopicTemplate
from gateway.ingest.routes.values import (
    bare_payload_value,
    conform_to_type,
    encode_value,
    field_value_json,
    parse_json,
    plain_number,
    preview,
    validate_ts_ms,
)
from gateway.models import MAX_BLYNK_ID, Reading
from gateway.sampling import DEFAULT_DAILY_LIMIT, FitRule, Rule, SamplingPlan, compile_rules

# Topics remembered with their answer; beyond this (a publisher inventing topics) the
# answer is computed each time instead of growing memory. Bytes are estimated: a topic is
# held twice (the key, and its captured names) plus ~200 bytes of dict slot and objects.
MATCH_CACHE_MAX = 100_000
MATCH_CACHE_MAX_BYTES = 16 * 1024 * 1024
MATCH_CACHE_ENTRY_BYTES = 200
# Longer topics are matched every time and never cached: they are not a site's sensors.
MATCH_CACHE_MAX_TOPIC = 512
DEFAULT_MAX_PAYLOAD_BYTES = 16_384
# A captured device or stream name longer than this (UTF-8 bytes) is refused as
# `name_too_long`: no sensor is named in 60 KB, and such a name must not reach a cache,
# the unmapped-names list, `status` or a log line.
MAX_NAME_BYTES = 128


@dataclass(frozen=True, slots=True)
class Target:
    """A datastream and its declared type (None: not declared, treated as numeric)."""

    datastream_id: int
    value_type: str | None = None

    @classmethod
    def of(cls, entry: FieldSettings) -> Target:
        return cls(entry.datastream, entry.type)


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    """A `[[routes]]` entry made ready for the hot path."""

    topic: TopicTemplate
    device_id: int | None
    device_path: JsonPath | None
    target: Target | None
    fields: tuple[tuple[JsonPath, Target], ...]
    fields_by_name: Mapping[str, Target]
    streams: Mapping[str, Target]
    ts_path: JsonPath | None
    reader: TimestampReader
    format: str
    accept_retained: bool
    max_future_ms: int
    reject_bad_ts: bool
    # a single datastream, no payload paths: a bare number can take the fast path
    plain: bool = False
    # `sample` rules by datastream, and the rule of a datastream not listed (gateway/sampling.py)
    samples: Mapping[int, Rule | FitRule | None] = field(default_factory=dict)
    default_sample: Rule | FitRule | None = None

    @property
    def name(self) -> str:
        """The route as the operator wrote it: its topic template."""
        return self.topic.template

    @classmethod
    def compile(cls, settings: RouteSettings) -> CompiledRoute:
        fields = settings.field_map()
        samples, default_sample = compile_rules(settings)
        return cls(
            topic=TopicTemplate.parse(settings.topic),
            device_id=settings.device_id,
            device_path=JsonPath.parse(settings.device_field) if settings.device_field else None,
            target=(
                Target(settings.datastream_id, settings.type)
                if settings.datastream_id is not None
                else None
            ),
            fields=tuple(
                (JsonPath.parse(path), Target.of(entry)) for path, entry in fields.items()
            ),
            fields_by_name={path: Target.of(entry) for path, entry in fields.items()},
            streams={name: Target.of(entry) for name, entry in settings.stream_map().items()},
            ts_path=JsonPath.parse(settings.timestamp) if settings.timestamp else None,
            reader=TimestampReader(
                parse_timezone(settings.timezone) if settings.timezone else None
            ),
            format=settings.format,
            accept_retained=settings.retained == "accept",
            max_future_ms=int(settings.max_future_s * 1000),
            reject_bad_ts=settings.bad_timestamp == "reject",
            plain=(
                settings.format == "auto"
                and settings.fields is None
                and settings.device_field is None
                and settings.timestamp is None
            ),
            samples=samples,
            default_sample=default_sample,
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why (part of) a message was not stored; becomes a dead letter."""

    code: str
    detail: str | None
    device_id: int | None
    datastream_id: int | None


@dataclass(slots=True)
class Outcome:
    """What one message became. `unmapped` names why it maps to nothing at all."""

    route: CompiledRoute | None = None
    readings: list[Reading] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    unmapped: str | None = None
    unmapped_detail: str | None = None
    unknown_device: str | None = None
    retained_skipped: int = 0
    ts_replaced: int = 0
    ts_problem: str | None = None  # why the last replaced time was not trusted
    no_reading: int = 0
    # indexes of the readings stamped with the receive time (no trusted time of their
    # own): while the clock is not trusted, admission holds these (gateway/clock.py)
    received: list[int] | None = None


@dataclass(frozen=True, slots=True)
class _Match:
    route: CompiledRoute
    device_name: str | None
    stream_name: str | None
    # (code, detail) when a captured name can never be used: found once per topic
    problem: tuple[str, str] | None = None


@dataclass(slots=True)
class _Item:
    """One value found in a payload, before its time is settled."""

    target: Target
    raw_value: Any
    raw_ts: Any = MISSING
    strict_ms: bool = False  # the legacy `{"value", "ts"}` form: ts must be epoch ms
    ts_problem: str | None = None  # a time already known to be unusable (SenML bt + t)


class RouteTable:
    """Finds the route for a topic and turns its payload into readings."""

    def __init__(
        self,
        routes: Sequence[RouteSettings],
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        devices: Mapping[str, int] | None = None,
        *,
        numeric_ids: bool | None = None,
        daily_points_limit: int = DEFAULT_DAILY_LIMIT,
    ) -> None:
        """`numeric_ids`: an unlisted all-digit device name is the device id itself (the
        `[devices]` entry `"+" = "numeric-id"`); None takes it from `devices` when that is
        the configured `DeviceNames`, else off. `daily_points_limit` sizes `fit` windows."""
        self.routes = tuple(CompiledRoute.compile(route) for route in routes)
        self.max_payload_bytes = max_payload_bytes
        self.devices = dict(devices or {})
        if numeric_ids is None:
            numeric_ids = isinstance(devices, DeviceNames) and devices.numeric_ids
        self.numeric_ids = numeric_ids
        self.sampling = SamplingPlan(
            routes,
            self.devices.values(),
            numeric_ids=numeric_ids,
            daily_limit=daily_points_limit,
        )
        self._by_topic: dict[str, _Match | None] = {}
        self._cached_bytes = 0
        self._stamps = ReceiveStamps()

    def forget_receive_stamps(self) -> None:
        """The clock stepped: stamps follow it from now on. After a step back, the stamps
        handed out before it lie ahead of the clock, and a stream's next readings would
        otherwise be crammed a millisecond apart right after them until it caught up."""
        self._stamps = ReceiveStamps()

    def keep_receive_stamps(self, previous: RouteTable) -> None:
        """Carry on from the table this one replaces (a reload): the stamps it handed out
        stay used, so no reading gets a stamp an earlier one of its stream already has."""
        self._stamps = previous._stamps

    def rule_for(self, route: CompiledRoute, device_id: int, datastream_id: int) -> Rule | None:
        """The `sample` rule in force for a reading the route produced (None: sent as is)."""
        rule = route.samples.get(datastream_id, route.default_sample)
        return self.sampling.resolve(rule, device_id) if rule is not None else None

    @property
    def subscriptions(self) -> list[str]:
        return list(dict.fromkeys(route.topic.subscription for route in self.routes))

    def match(self, topic: str) -> CompiledRoute | None:
        found = self._match(topic)
        return None if found is None else found.route

    def _match(self, topic: str) -> _Match | None:
        try:
            return self._by_topic[topic]
        except KeyError:
            pass
        found = None
        for route in self.routes:
            captured = route.topic.capture(topic)
            if captured is not None:
                found = _Match(route, *captured, self._name_problem(route, *captured))
                break
        self._remember(topic, found)
        return found

    def _remember(self, topic: str, found: _Match | None) -> None:
        cost = MATCH_CACHE_ENTRY_BYTES + 2 * len(topic)
        if (
            len(topic) <= MATCH_CACHE_MAX_TOPIC
            and len(self._by_topic) < MATCH_CACHE_MAX
            and self._cached_bytes + cost <= MATCH_CACHE_MAX_BYTES
        ):
            self._by_topic[topic] = found
            self._cached_bytes += cost

    @property
    def cached_topics(self) -> tuple[int, int]:
        """(topics cached, their estimated bytes), for tests and diagnostics."""
        return len(self._by_topic), self._cached_bytes

    def _name_problem(
        self, route: CompiledRoute, device_name: str | None, stream_name: str | None
    ) -> tuple[str, str] | None:
        """Why a topic's captured names can never become a reading, or None."""
        if device_name is not None:
            problem = self._device_name_problem(device_name)
            if problem is not None:
                return problem
        if stream_name is not None:
            if _too_long(stream_name):
                return "name_too_long", _too_long_detail("stream", stream_name)
            if not route.streams:
                number = _digits(stream_name)
                if number is not None and not 0 < number <= MAX_BLYNK_ID:
                    return "id_out_of_range", _id_detail("datastream", number)
        return None

    def _device_name_problem(self, name: str) -> tuple[str, str] | None:
        if _too_long(name):
            return "name_too_long", _too_long_detail("device", name)
        if self.numeric_ids and name not in self.devices:
            number = _digits(name)
            if number is not None and not 0 < number <= MAX_BLYNK_ID:
                return "id_out_of_range", _id_detail("device", number)
        return None

    def device_for(self, name: str) -> int | None:
        """A device name's id: `[devices]` first, then, with `numeric_ids`, a name that is
        itself an id (positive, at most MAX_BLYNK_ID); None if neither."""
        device_id = self.devices.get(name)
        if device_id is None and self.numeric_ids and not _too_long(name):
            number = _digits(name)
            if number is not None and 0 < number <= MAX_BLYNK_ID:
                return number
        return device_id

    # ------------------------------------------------------------------ one message

    def route(
        self, topic: str, payload: bytes, received_ms: int, *, retained: bool = False
    ) -> Outcome:
        """What one message becomes; never raises (see the module's docstring)."""
        try:
            return self._route(topic, payload, received_ms, retained)
        except Exception as exc:  # free while nothing raises; one message costs only itself
            found = self._by_topic.get(topic)
            outcome = Outcome(found.route if found is not None else None)
            self._refuse(outcome, "internal_error", describe_exception(exc), None, None)
            return outcome

    def _route(self, topic: str, payload: bytes, received_ms: int, retained: bool) -> Outcome:
        matched = self._match(topic)
        if matched is None:
            return Outcome(unmapped="unmapped_topic", unmapped_detail="no route matches this topic")
        route = matched.route
        outcome = Outcome(route)
        if matched.problem is not None:
            self._refuse(outcome, *matched.problem, None, route.target)
            return outcome
        device_id = route.device_id
        if matched.device_name is not None:
            device_id = self._named_device(matched.device_name, outcome)
            if device_id is None:
                return outcome
        target = route.target
        if matched.stream_name is not None:
            target = self._named_stream(route, matched.stream_name, outcome)
            if target is None:
                return outcome
        if len(payload) > self.max_payload_bytes:
            detail = f"{len(payload)} bytes exceeds max_payload_bytes={self.max_payload_bytes}"
            self._refuse(outcome, "payload_too_large", detail, device_id, target)
            return outcome
        if route.plain and target is not None and device_id is not None:
            reading = self._plain_reading(
                route, device_id, target, payload, received_ms, retained, outcome
            )
            if reading is not None:
                outcome.readings.append(reading)
                return outcome
        try:
            device_id, items = self._items(route, target, device_id, payload, received_ms, outcome)
        except PayloadError as exc:
            self._refuse(outcome, exc.code, exc.detail, device_id, target)
            return outcome
        if device_id is None:
            return outcome
        if not items:
            outcome.unmapped = "no_mapped_fields"
            outcome.unmapped_detail = "none of this route's fields is in the message"
        # An auto-format message holds at most one reading per field: stamped as they come.
        unstamped: list[int] | None = None if route.format == "auto" else []
        for item in items:
            self._add_reading(route, device_id, item, received_ms, retained, outcome, unstamped)
        if unstamped:
            self._stamp_on_receipt(outcome.readings, unstamped, received_ms)
            outcome.received = unstamped
        return outcome

    def _plain_reading(
        self,
        route: CompiledRoute,
        device_id: int,
        target: Target,
        payload: bytes,
        received_ms: int,
        retained: bool,
        outcome: Outcome,
    ) -> Reading | None:
        """The hot paths of a single-datastream route: a bare number, or `{"value": number,
        "ts": epoch ms}`, without the general machinery. None hands the payload to the
        general path, which also says what is wrong with it."""
        first = payload[:1]
        ts_ms: int | None = None
        try:
            if first.isdigit():
                if retained and not route.accept_retained:
                    return None
                value_json = encode_value(plain_number(payload.decode("ascii")))
            elif first == b"{":
                document = json.loads(payload)
                value, ts_ms = document["value"], document["ts"]
                if (
                    len(document) != 2
                    or type(value) not in (int, float)
                    or type(ts_ms) is not int
                    or not MIN_TRUSTED_MS <= ts_ms <= received_ms + route.max_future_ms
                ):
                    return None
                value_json = encode_value(value)
            else:
                return None
            if target.value_type is not None:
                value_json = conform_to_type(target.value_type, value_json)
        except (PayloadError, ValueError, KeyError, TypeError, RecursionError):
            return None
        if ts_ms is None:
            ts_ms = self._receive_stamp(device_id, target.datastream_id, received_ms)
            outcome.received = [0]  # the message's only reading
        return Reading(device_id, target.datastream_id, ts_ms, value_json)

    def _named_device(self, name: str, outcome: Outcome) -> int | None:
        device_id = self.device_for(name)
        if device_id is None:
            outcome.unmapped = "device_unmapped"
            outcome.unknown_device = name
            outcome.unmapped_detail = f"device name {name!r} is not in [devices]"
        return device_id

    def _named_stream(self, route: CompiledRoute, name: str, outcome: Outcome) -> Target | None:
        target = route.streams.get(name)
        if target is None and not route.streams and name.isascii() and name.isdigit():
            target = Target(int(name))
        if target is None:
            outcome.unmapped = "stream_unmapped"
            outcome.unmapped_detail = f"stream name {name!r} is not in this route's streams"
        return target

    def _items(
        self,
        route: CompiledRoute,
        target: Target | None,
        device_id: int | None,
        payload: bytes,
        now_ms: int,
        outcome: Outcome,
    ) -> tuple[int | None, list[_Item]]:
        """The device (it may come from the payload) and the values the payload holds."""
        if route.format == "auto" and not route.fields:
            value, is_json = bare_payload_value(payload)
            if not (is_json and isinstance(value, dict)):
                assert target is not None  # config: a route without fields has a datastream
                return device_id, [_Item(target, value)]
            document: Any = value
        else:
            document = parse_json(payload)
        if route.device_path is not None:
            device_id = self._payload_device(route, document, outcome)
        if route.format == "senml":
            return device_id, self._senml_items(route, document, now_ms, outcome)
        if route.format == "array":
            if not isinstance(document, list):
                raise PayloadError("not_an_array", f"format = array, got {_kind(document)}")
            items: list[_Item] = []
            for element in document:
                items += self._element_items(route, target, element, in_array=True)
            return device_id, items
        return device_id, self._element_items(route, target, document, in_array=False)

    def _payload_device(self, route: CompiledRoute, document: Any, outcome: Outcome) -> int | None:
        assert route.device_path is not None
        if route.format == "senml" and route.device_path.text == "bn":
            names = [r.get("bn") for r in _as_list(document) if isinstance(r, dict)]
            raw: Any = next((name for name in names if name), MISSING)
            if isinstance(raw, str):
                raw = raw.rstrip(":/-_.")
        else:
            raw = route.device_path.get(document)
        if raw is MISSING or raw is None or isinstance(raw, dict | list | bool):
            outcome.unmapped = "no_device_field"
            outcome.unmapped_detail = f"no device name at {route.device_path.text!r}"
            return None
        # A JSON integer is a name like any other (json.loads bounds its digits at 4,300).
        name = raw if isinstance(raw, str) else str(raw)
        problem = self._device_name_problem(name)
        if problem is not None:
            self._refuse(outcome, *problem, None, route.target)
            return None
        return self._named_device(name, outcome)

    def _element_items(
        self, route: CompiledRoute, target: Target | None, element: Any, *, in_array: bool
    ) -> list[_Item]:
        """A JSON object (fields, or `{"value", "ts"}`) or, in an array, `[ts, value]`."""
        if route.fields:
            if not isinstance(element, dict):
                raise PayloadError(
                    "not_an_object", f"fields need a JSON object, got {_kind(element)}"
                )
            raw_ts = route.ts_path.get(element) if route.ts_path else MISSING
            if in_array and route.ts_path is None:
                raw_ts = element.get("ts", MISSING)
            return [
                _Item(field_target, value, raw_ts)
                for path, field_target in route.fields
                if (value := path.get(element)) is not MISSING
            ]
        assert target is not None
        if in_array and isinstance(element, list) and len(element) == 2:
            return [_Item(target, element[1], element[0])]
        if not isinstance(element, dict):
            if in_array:
                raise PayloadError(
                    "not_an_object",
                    f"array items are {{value, ts}} or [ts, value], got {_kind(element)}",
                )
            return [_Item(target, element)]
        if "value" not in element:
            raise PayloadError("no_value_key", f"keys: {preview(str(sorted(element)[:8]))}")
        if route.ts_path is not None:
            return [_Item(target, element["value"], route.ts_path.get(element))]
        raw_ts = element.get("ts", MISSING)
        return [_Item(target, element["value"], raw_ts, strict_ms=not in_array)]

    def _senml_items(
        self, route: CompiledRoute, document: Any, now_ms: int, outcome: Outcome
    ) -> list[_Item]:
        items = []
        for record in senml_records(document, now_ms):
            target = route.fields_by_name.get(record.name) or route.fields_by_name.get(
                record.short_name
            )
            if target is not None:
                raw_ts = MISSING if record.ts_ms is None else record.ts_ms
                items.append(_Item(target, record.value, raw_ts, ts_problem=record.ts_problem))
        return items

    # ------------------------------------------------------------------ one reading

    def _add_reading(
        self,
        route: CompiledRoute,
        device_id: int,
        item: _Item,
        received_ms: int,
        retained: bool,
        outcome: Outcome,
        unstamped: list[int] | None,
    ) -> None:
        """Adds the item's reading. One without a time of its own is listed in `unstamped`
        when given (its stamp depends on how many of its stream the message holds)."""
        target = item.target
        try:
            value_json = field_value_json(item.raw_value, target.value_type)
            ts_ms = self._payload_time(route, item, received_ms, outcome)
        except PayloadError as exc:
            self._refuse(outcome, exc.code, exc.detail, device_id, target)
            return
        if value_json is None:
            outcome.no_reading += 1
            return
        if ts_ms is None:
            if retained and not route.accept_retained:
                # A replay of the last value, published at an unknown time: "now" would lie.
                outcome.retained_skipped += 1
                return
            if unstamped is None:
                ts_ms = self._receive_stamp(device_id, target.datastream_id, received_ms)
                if outcome.received is None:
                    outcome.received = []
                outcome.received.append(len(outcome.readings))
            else:
                unstamped.append(len(outcome.readings))
                ts_ms = received_ms
        outcome.readings.append(Reading(device_id, target.datastream_id, ts_ms, value_json))

    def _payload_time(
        self, route: CompiledRoute, item: _Item, now_ms: int, outcome: Outcome
    ) -> int | None:
        """The payload's own time in ms, None to use the receive time; raises if refused."""
        raw_ts = item.raw_ts
        if item.ts_problem is not None:
            return self._untrusted_time(route, item.ts_problem, outcome)
        if raw_ts is MISSING or raw_ts is None:
            return None
        if item.strict_ms:
            ts_ms = validate_ts_ms(raw_ts)
            problem = untrusted_reason(ts_ms, now_ms, route.max_future_ms)
        else:
            try:
                ts_ms = route.reader.to_ms(raw_ts)
                problem = untrusted_reason(ts_ms, now_ms, route.max_future_ms)
            except PayloadError as exc:
                problem = exc.detail
        if problem is None:
            return ts_ms
        return self._untrusted_time(route, problem, outcome)

    @staticmethod
    def _untrusted_time(route: CompiledRoute, problem: str, outcome: Outcome) -> None:
        """A payload time that cannot be used: refused, or replaced by the receive time."""
        if route.reject_bad_ts:
            raise PayloadError("bad_timestamp", problem)
        outcome.ts_replaced += 1
        outcome.ts_problem = problem
        return None

    def _receive_stamp(self, device_id: int, datastream_id: int, received_ms: int) -> int:
        """Receive time, made strictly increasing per datastream.

        Two readings without their own time that arrive in the same millisecond (a burst, or
        the broker draining its queue after an outage) are still two readings: equal stamps
        would make them one point, both here (the buffer keeps one row per stream, ts and
        value) and in the cloud. Each later one is moved forward by a millisecond instead.
        """
        return self._stamps.one((device_id, datastream_id), received_ms)

    def _stamp_on_receipt(self, readings: list[Reading], unstamped: list[int], now_ms: int) -> None:
        """Stamps a message's untimed readings, each stream's as one block (stamps.py): an
        array of them ends at the arrival instead of running ahead of it."""
        by_stream: dict[tuple[int, int], list[int]] = {}
        for index in unstamped:
            reading = readings[index]
            by_stream.setdefault((reading.device_id, reading.datastream_id), []).append(index)
        for key, indexes in by_stream.items():
            stamps = self._stamps.block(key, len(indexes), now_ms)
            for index, stamp in zip(indexes, stamps, strict=True):
                readings[index] = readings[index]._replace(ts_ms=stamp)

    @staticmethod
    def _refuse(
        outcome: Outcome,
        code: str,
        detail: str | None,
        device_id: int | None,
        target: Target | None,
    ) -> None:
        datastream_id = target.datastream_id if target is not None else None
        outcome.refusals.append(Refusal(code, detail, device_id, datastream_id))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def describe_exception(exc: BaseException) -> str:
    """`internal_error`'s detail: the exception's type first, then a bounded message."""
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ fails is still an exception
        message = ""
    return f"{type(exc).__name__}: {preview(message)}" if message else type(exc).__name__


def _too_long(name: str) -> bool:
    """More than MAX_NAME_BYTES in UTF-8? (Encodes only names that could be.)"""
    if len(name) > MAX_NAME_BYTES:
        return True
    return len(name) * 4 > MAX_NAME_BYTES and (
        len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES
    )


def _too_long_detail(kind: str, name: str) -> str:
    size = len(name.encode("utf-8", "surrogatepass"))
    return f"{kind} name of {size} bytes, more than {MAX_NAME_BYTES}: {preview(name, 40)}"


def _digits(name: str) -> int | None:
    """The number an all-ASCII-digit name spells (names are bounded: int() stays cheap)."""
    return int(name) if name.isascii() and name.isdigit() else None


def _id_detail(kind: str, number: int) -> str:
    return f"{kind} id {preview(str(number), 40)} is not in 1..{MAX_BLYNK_ID}"


def _as_list(document: Any) -> Iterable[Any]:
    return document if isinstance(document, list) else [document]
