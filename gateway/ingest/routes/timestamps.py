"""A reading's time from whatever the publisher wrote, and whether to believe it.

Publishers write epoch seconds (Shelly, ESPHome), milliseconds (custom firmware),
microseconds, ISO 8601 with an offset (zigbee2mqtt `last_seen`) or naive local time (Tasmota
`Time`, in the device's own zone, often a fixed +01:00 without DST). Epoch units are told
apart by magnitude: 1e11 seconds is the year 5138, 1e11 ms is 1973, so the ranges never
overlap for any date a sensor can mean. A time is not trusted when it is in the future
(beyond a tolerance) or before 2020: a device that booted without a clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any

from gateway.errors import PayloadError

# 2020-01-01T00:00:00Z: earlier stamps come from devices that have not set their clock.
MIN_TRUSTED_MS = 1_577_836_800_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)
# Magnitude limits of each epoch unit (exclusive upper bounds).
_SECONDS_BELOW = 1e11
_MILLIS_BELOW = 1e14
_MICROS_BELOW = 1e17
# Nanoseconds up to the year 5138 too; anything larger (a 400-digit integer, 1e308) is no
# time at all, and would overflow the float and SQLite conversions downstream.
_NANOS_BELOW = 1e20
# The longest text that can be a time: ISO 8601 with µs and an offset is 32 characters. A
# longer one is refused before `int()` (quadratic in the digits, and a ValueError beyond
# Python's 4,300-digit limit) or `fromisoformat` ever sees it.
MAX_TIME_TEXT = 40


def epoch_to_ms(number: float) -> int:
    """Seconds, ms, µs or ns since the epoch (told apart by magnitude) → ms.

    Raises `PayloadError("bad_timestamp")` for NaN, infinities and magnitudes no epoch unit
    can mean (checked before any float conversion: a huge int is compared exactly).
    """
    magnitude = abs(number)
    if not magnitude < _NANOS_BELOW:  # also NaN, which compares False with everything
        raise PayloadError("bad_timestamp", f"not a time: {_short(number)}")
    if magnitude < _SECONDS_BELOW:
        return math.floor(number * 1000)
    if magnitude < _MILLIS_BELOW:
        return math.floor(number)
    if magnitude < _MICROS_BELOW:
        return math.floor(number / 1000)
    return math.floor(number / 1_000_000)


@dataclass(frozen=True, slots=True)
class TimestampReader:
    """Turns one route's payload timestamps into epoch ms; `zone` is for naive local times.

    `zone=None` means the host's local time, which is what a device configured like its
    gateway sends.
    """

    zone: tzinfo | None = None

    def to_ms(self, raw: Any) -> int:
        """Epoch ms, or `PayloadError("bad_timestamp")` saying what could not be read."""
        if isinstance(raw, bool) or raw is None:
            raise PayloadError("bad_timestamp", f"not a time: {raw!r}")
        if isinstance(raw, int | float):
            return epoch_to_ms(raw)
        if isinstance(raw, str):
            return self._text_to_ms(raw.strip())
        raise PayloadError("bad_timestamp", f"not a time: {type(raw).__name__}")

    def _text_to_ms(self, text: str) -> int:
        if not text:
            raise PayloadError("bad_timestamp", "empty time")
        if len(text) > MAX_TIME_TEXT:
            raise PayloadError("bad_timestamp", f"{len(text)} characters: {_short(text)}")
        if text[0].isdigit() and text.replace(".", "", 1).isdigit():
            return epoch_to_ms(float(text) if "." in text else int(text))
        try:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=self.zone) if self.zone else moment.astimezone()
            return (moment - _EPOCH) // _ONE_MS
        except (ValueError, OverflowError, OSError) as exc:  # year 1 in local time: Overflow
            raise PayloadError(
                "bad_timestamp", f"neither epoch nor ISO 8601: {text[:40]!r}"
            ) from exc


def untrusted_reason(ts_ms: int, now_ms: int, max_future_ms: int) -> str | None:
    """Why a payload's time cannot be used as the reading's time, or None if it can."""
    if ts_ms > now_ms + max_future_ms:
        ahead_s = (ts_ms - now_ms) // 1000  # integer division: exact for any size
        return f"ts {ts_ms} is {ahead_s} s ahead of the gateway's clock"
    if ts_ms < MIN_TRUSTED_MS:
        return f"ts {ts_ms} is before 2020 (a device clock that was never set?)"
    return None


def _short(value: object, limit: int = 40) -> str:
    """A bounded repr for details: a 5,000-digit time must not become a 5,000-byte detail."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**limit else "a huge int"
    return text if len(text) <= limit else text[:limit] + "…"
