"""Reading values out of JSON documents: dotted paths and SenML records.

Paths are split once, when the route is built, never per message. A step is a dict key, or
a list index when the step is digits and the value is a list; keys may hold `:` and `-`
(`params.switch:0.apower`, `DS18B20-2.Temperature`). A key that itself contains dots is
found when the whole path is a key of the top-level object.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

from gateway.errors import PayloadError
from gateway.ingest.routes.timestamps import epoch_to_ms


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()
# RFC 8428 §4.5.3: times below 2**28 seconds are relative to now.
SENML_RELATIVE_BELOW_S = 2**28


@dataclass(frozen=True, slots=True)
class JsonPath:
    text: str
    steps: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> JsonPath:
        return cls(text, tuple(text.split(".")))

    def get(self, document: Any) -> Any:
        """The value at this path, or `MISSING` if the document has none there."""
        if isinstance(document, dict):
            found = document.get(self.text, MISSING)
            if found is not MISSING or len(self.steps) == 1:
                return found
        current = document
        for step in self.steps:
            if isinstance(current, dict):
                current = current.get(step, MISSING)
                if current is MISSING:
                    return MISSING
            elif isinstance(current, list) and step.isdigit() and int(step) < len(current):
                current = current[int(step)]
            else:
                return MISSING
        return current


@dataclass(frozen=True, slots=True)
class SenmlRecord:
    """One resolved SenML record: full name (bn + n), raw value, time in ms if it has one."""

    name: str
    short_name: str
    base_name: str
    value: Any
    ts_ms: int | None
    # why bt + t is no time (NaN, 1e308): the route's `bad_timestamp` decides what follows
    ts_problem: str | None = None


def senml_records(document: Any, now_ms: int) -> Iterator[SenmlRecord]:
    """Resolve a SenML pack (RFC 8428): base fields carry over to the records after them."""
    if isinstance(document, dict):
        document = [document]
    if not isinstance(document, list):
        raise PayloadError(
            "not_senml", f"a SenML pack is a JSON array, got {type(document).__name__}"
        )
    base_name, base_time_s = "", 0.0
    for record in document:
        if not isinstance(record, dict):
            raise PayloadError("not_senml", f"a SenML record is an object, got {record!r:.40}")
        base_name = record.get("bn", base_name)
        base_time_s = _number(record.get("bt", base_time_s), "bt")
        short_name = record.get("n", "")
        if not isinstance(base_name, str) or not isinstance(short_name, str):
            raise PayloadError("not_senml", "bn and n must be strings")
        value = _senml_value(record)
        if value is MISSING:
            continue  # a record that only sets base fields
        ts_ms, problem = None, None
        if "t" in record or "bt" in record or base_time_s:
            time_s = base_time_s + _number(record.get("t", 0), "t")
            try:
                if abs(time_s) < SENML_RELATIVE_BELOW_S:
                    ts_ms = now_ms + round(time_s * 1000)
                else:
                    ts_ms = epoch_to_ms(time_s)  # refuses NaN, inf and absurd magnitudes
            except PayloadError as exc:
                problem = exc.detail
        yield SenmlRecord(base_name + short_name, short_name, base_name, value, ts_ms, problem)


def _senml_value(record: dict[str, Any]) -> Any:
    for key in ("v", "vs", "vb"):
        if key in record:
            return record[key]
    if "s" in record:
        return record["s"]
    return MISSING


def _number(raw: Any, key: str) -> float:
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise PayloadError("not_senml", f"{key} must be a number, got {raw!r:.40}")
    try:
        return float(raw)
    except OverflowError:  # an int beyond float range: no time either (see epoch_to_ms)
        return math.inf if raw > 0 else -math.inf
