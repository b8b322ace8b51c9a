"""Text from outside the gateway (device names from topics, the cloud's messages) as
`blynk-gateway status` and the status socket show it: short, and on one line.

A topic level is whatever a publisher sent, up to 64 KiB; before issue 16 twenty such
names made the status answer 1.2 MB, and a newline in one could forge a line of the
status table. `clip` escapes control characters and cuts what is left to `SHOWN_CHARS`,
ending a cut text with a marker that gives its full length.
"""

from __future__ import annotations

from collections.abc import Iterable

SHOWN_CHARS = 120


def _escaped(char: str) -> str:
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` in at most `limit` characters, control characters escaped; a longer one
    ends with `…[N chars]`, N its length before. Clipping a clipped text changes nothing."""
    head = "".join(_escaped(char) for char in text[:limit])
    if len(text) <= limit and len(head) <= limit:
        return head
    marker = f"…[{len(text)} chars]"
    return head[: max(0, limit - len(marker))] + marker


def clip_keys(counts: Iterable[tuple[str, int]], limit: int = SHOWN_CHARS) -> dict[str, int]:
    """Counts by name, names clipped; two names that clip alike share their count."""
    clipped: dict[str, int] = {}
    for name, count in counts:
        key = clip(name, limit)
        clipped[key] = clipped.get(key, 0) + count
    return clipped
