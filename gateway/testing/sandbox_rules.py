"""What the sandbox cloud accepts: datastream types and the values that fit them.

Blynk's documented rules (`blynk-import-api.md` §4), strict where the documentation is
silent: a value that does not fit its datastream's type is refused, never cropped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

MAX_STRING_BYTES = 1024
# "enum" is stored as an integer by Blynk, so it is validated like one.
DATASTREAM_TYPES = frozenset({"double", "integer", "enum", "string", "boolean", "location"})
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


def is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a double
        return False


def value_fits(kind: str, value: object) -> bool:
    if kind == "double":
        return is_number(value)
    if kind in ("integer", "enum"):
        return (
            isinstance(value, int)
            and not isinstance(value, bool)
            and INT32_MIN <= value <= INT32_MAX
        )
    if kind == "string":
        if not isinstance(value, str):
            return False
        try:
            return len(value.encode("utf-8")) <= MAX_STRING_BYTES
        except UnicodeEncodeError:  # lone surrogates from a JSON "\ud800" escape
            return False
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "location":
        return isinstance(value, list) and len(value) == 2 and all(is_number(v) for v in value)
    raise AssertionError(f"unvalidated datastream type {kind!r}")


def short_repr(value: object) -> str:
    # A 1 KB string in an error message would drown the gateway's logs.
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_types(types: Mapping[int, str]) -> dict[int, str]:
    bad = {k: v for k, v in types.items() if v not in DATASTREAM_TYPES}
    if bad:
        raise ValueError(f"unknown datastream types {bad}; use one of {sorted(DATASTREAM_TYPES)}")
    return dict(types)


# Malformed tokens the sandbox can hand out (`SandboxCloud.bad_tokens`), as a broken or
# hostile token endpoint might: each must be a cloud error at the gateway, never a crash,
# and must never be echoed in its log or status. The texts share a marker tests look for.
BAD_TOKEN_MARKER = "leaked"
BAD_TOKENS: dict[str, object] = {
    "newline": f"{BAD_TOKEN_MARKER}-access-token\nX-Injected: 1",
    "non_ascii": f"{BAD_TOKEN_MARKER}-access-tökén-ümlaut",
    "control": f"{BAD_TOKEN_MARKER}-access\x00token\x7f",
    "space": f"{BAD_TOKEN_MARKER} access token",
    "empty": "",
    "not_string": {"token": f"{BAD_TOKEN_MARKER}-access-token"},
    "number": 424242424242,
}
