"""What SQLite can hold, checked in Python: used only after an append failed on a value.

Routing already refuses ids beyond Blynk's range (`id_out_of_range`), so these checks are
the safety net, never the hot path: when `Store.append` raises `UnstorableValue`, ingest
asks here which readings were at fault, dead-letters those (reason `unstorable`) and
commits the rest. An INTEGER is a signed 64-bit int; TEXT must encode as UTF-8.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from typing import Any

from gateway.models import Reading
from gateway.store.deadletters import RejectedPayload

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# What binding a value SQLite cannot hold raises: a Python int beyond 64 bits, a string
# with a lone surrogate, a type sqlite3 does not adapt.
BINDING_ERRORS = (
    OverflowError,
    UnicodeEncodeError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
)


def fits_integer(value: Any) -> bool:
    """Can SQLite store this as an INTEGER? (bool is an int; floats are another column.)"""
    return isinstance(value, int) and INT64_MIN <= value <= INT64_MAX


def is_text(value: Any) -> bool:
    """Can SQLite store this as TEXT (UTF-8, so no lone surrogates)?"""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def reading_problem(reading: Reading) -> str | None:
    """Why SQLite cannot store this reading, or None if it can."""
    for name in ("device_id", "datastream_id", "ts_ms"):
        value = getattr(reading, name)
        if not fits_integer(value):
            return f"{name} {_short(value)} does not fit a 64-bit INTEGER"
    if not is_text(reading.value_json):
        return f"value {_short(reading.value_json)} is not storable text"
    return None


def storable_rejected(item: RejectedPayload) -> RejectedPayload:
    """The dead letter with what SQLite cannot hold left out (ids) or re-spelled (text)."""
    changes: dict[str, Any] = {}
    for name in ("device_id", "datastream_id", "ts_ms"):
        value = getattr(item, name)
        if value is not None and not fits_integer(value):
            changes[name] = None
    for name in ("reason", "topic", "detail", "value_json"):
        value = getattr(item, name)
        if value is not None and not is_text(value):
            changes[name] = _as_text(value)
    if not isinstance(item.payload, bytes):
        changes["payload"] = _as_text(item.payload).encode()
    return replace(item, **changes) if changes else item


def _as_text(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _short(value: Any, limit: int = 40) -> str:
    if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
        digits = len(str(abs(value))) if abs(value) < 10**4000 else "4000+"
        return f"(an integer of {digits} digits)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
