"""Structured logging: one event per state change, key=value fields, never a secret.

Where stdout is not a TTY (a pipe, a file) events are JSON lines; on a terminal they are
rendered for humans. Under journald (stdout is the stream named by `$JOURNAL_STREAM`) each
line starts with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug,
as sd-daemon(3) defines) so `journalctl -p warning` filters them, carries no timestamp of
its own (the journal stamps every line), and by default reads `event key=value ...`.
Secrets are removed twice: any field whose name looks secret is masked, and the literal
values of configured secrets are scrubbed from every string, so a secret cannot leak
through an exception message either. Fields that carry text from outside (a topic, a
device name, a payload excerpt) are cut to MAX_FIELD_CHARS, so a 60 KB topic makes a line
of normal length (`truncate_outside_text`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console", "logfmt"]

_SECRET_FIELD_PARTS = ("secret", "password", "token", "authorization")
_MASK = "***"
ROTATING_KEPT = 2
# sd-daemon(3) prefixes: the journal turns them into the entry's PRIORITY.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
# Fields whose text comes from publishers or the cloud, and how much of it a line shows.
# (`error` is cut where it comes from input: elsewhere it is the gateway's own advice.)
OUTSIDE_TEXT_FIELDS = ("topic", "name", "excerpt", "detail", "hint")
MAX_FIELD_CHARS = 120


def _escaped(char: str) -> str:
    return char if char.isprintable() else char.encode("unicode_escape").decode("ascii")


def clip(text: str, limit: int = MAX_FIELD_CHARS) -> str:
    """Text from outside (a topic, a device name, the cloud's words) as a log line or
    `status` shows it: control characters escaped (a newline cannot forge a line), at most
    `limit` characters, a cut text ending with `…[N chars]` (N its length before).
    Clipping a clipped text changes nothing. Before issue 16 one 60 KB topic level made
    a 180 KB log line and twenty of them a 1.2 MB status answer."""
    head = "".join(_escaped(char) for char in text[:limit])
    if len(text) <= limit and len(head) <= limit:
        return head
    marker = f"…[{len(text)} chars]"
    return head[: max(0, limit - len(marker))] + marker


def clip_keys(counts: Iterable[tuple[str, int]], limit: int = MAX_FIELD_CHARS) -> dict[str, int]:
    """Counts by name, names clipped; two names that clip alike share their count."""
    clipped: dict[str, int] = {}
    for name, count in counts:
        key = clip(name, limit)
        clipped[key] = clipped.get(key, 0) + count
    return clipped


def truncate_outside_text(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: cut the outside-text fields (after the secret scrubber, so a
    secret is never cut in two and missed). Five lookups per line."""
    for key in OUTSIDE_TEXT_FIELDS:
        value = event_dict.get(key)
        if type(value) is str and len(value) > MAX_FIELD_CHARS:
            event_dict[key] = clip(value)
    return event_dict


class SecretScrubber:
    """A structlog processor that masks secret-looking fields and known secret values."""

    def __init__(self) -> None:
        # Replaced, never changed in place: a thread logging meanwhile scrubs with either.
        self._secret_values: frozenset[str] = frozenset()
        # Secrets that are replaced over time (the cloud's tokens): the newest few per slot,
        # so a daemon that renews its token daily for years does not scrub an ever-longer
        # list. The one before the newest stays: a line about its last use may follow.
        self._rotating: dict[str, list[str]] = {}

    def register(self, *values: str | None) -> None:
        """Remember secret values (e.g. the client secret) so they are scrubbed everywhere."""
        for value in values:
            if value and len(value) >= 4:
                self._secret_values |= {value}

    def register_rotating(self, slot: str, value: object) -> None:
        """A new value of a secret that replaces older ones (an access token), as received:
        anything that is not text of 4 characters or more is ignored."""
        if not isinstance(value, str) or len(value) < 4:
            return
        kept = self._rotating.setdefault(slot, [])
        if value in kept:
            return
        kept.append(value)
        dropped = {kept.pop(0)} if len(kept) > ROTATING_KEPT else set()
        self._secret_values = (self._secret_values - dropped) | {value}

    def _is_secret_key(self, key: str) -> bool:
        lowered = key.lower()
        return any(part in lowered for part in _SECRET_FIELD_PARTS) and not lowered.endswith(
            ("_s", "_at", "_count", "_requests")
        )

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                key: _MASK
                if isinstance(key, str) and self._is_secret_key(key)
                else self._scrub(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(item) for item in value)
        if isinstance(value, str):
            for secret in self._secret_values:
                if secret in value:
                    value = value.replace(secret, _MASK)
            return value
        if isinstance(value, BaseException):
            return self._scrub(f"{type(value).__name__}: {value}")
        return value

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key in list(event_dict):
            if self._is_secret_key(key):
                event_dict[key] = _MASK
            else:
                event_dict[key] = self._scrub(event_dict[key])
        return event_dict


scrubber = SecretScrubber()


def is_journal_stream(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """True when `stream` is connected to journald: `$JOURNAL_STREAM` names its dev:inode.

    Comparing the inode, not just the variable's presence, matters: a child whose stdout
    is a pipe inherits the variable but not the journal.
    """
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(stream.fileno())
        return (stat.st_dev, stat.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False


class JournalPrefix:
    """The final renderer under journald: `<priority>` before every line of the event."""

    def __init__(self, renderer: Any) -> None:
        self._renderer = renderer

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        prefix = f"<{_PRIORITY.get(str(event_dict.get('level', method_name)), 6)}>"
        text = str(self._renderer(logger, method_name, event_dict))
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class EventFirstLogfmt:
    """`went_offline kind=unreachable backlog=12 component=flush`: the README's notation.

    The level is left out (the journal has it as the priority), as is the timestamp.
    """

    def __init__(self) -> None:
        self._fields = structlog.processors.LogfmtRenderer()

    def __call__(self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
        event = str(event_dict.pop("event", ""))
        event_dict.pop("level", None)
        fields = self._fields(logger, method_name, event_dict)
        return f"{event} {fields}" if fields else event


def configure(
    level: str = "info",
    log_format: LogFormat = "auto",
    stream: TextIO | None = None,
    secrets: Iterable[str | None] = (),
) -> None:
    """Set up structlog for the process; safe to call again (e.g. on reload or in tests)."""
    out = stream if stream is not None else sys.stdout
    scrubber.register(*secrets)
    journal = is_journal_stream(out)
    renderer: Any
    if log_format == "auto" and journal:
        renderer = EventFirstLogfmt()
    elif log_format == "json" or (log_format == "auto" and not out.isatty()):
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    elif log_format == "logfmt":
        key_order = ["level", "event"] if journal else ["timestamp", "level", "event"]
        renderer = structlog.processors.LogfmtRenderer(key_order=key_order)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    # Tracebacks become a string field (then scrubbed like any other); the console renderer
    # formats them itself.
    exceptions: list[Any] = (
        []
        if isinstance(renderer, structlog.dev.ConsoleRenderer)
        else [structlog.processors.format_exc_info]
    )
    # The journal stamps each line itself: a second timestamp only costs width.
    stamper = [] if journal else [structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            *stamper,
            *exceptions,
            scrubber,
            truncate_outside_text,
            JournalPrefix(renderer) if journal else renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )


def get_logger(component: str) -> structlog.typing.FilteringBoundLogger:
    """A logger with the component bound once, as the design notes ask.

    A lazy proxy, so module-level loggers follow a later `configure()` (reload, tests).
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.get_logger(component=component)
    return logger


class Throttle:
    """Lets one line per key through per interval and counts what it held back.

    Used for failures that can repeat thousands of times a second (bad payloads, a broker
    that keeps refusing): the first occurrence is logged at once, the rest are summarised.
    """

    def __init__(self, interval_s: float, clock: Any = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._last_logged: dict[object, float] = {}
        self._suppressed: dict[object, int] = {}

    def allow(self, key: object) -> tuple[bool, int]:
        """(should_log, suppressed_since_last_line) for this key."""
        now = self._clock()
        last = self._last_logged.get(key)
        if last is not None and now - last < self._interval_s:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, 0
        self._last_logged[key] = now
        return True, self._suppressed.pop(key, 0)


def format_duration(seconds: float) -> str:
    """Two units at most, as an operator reads it: `45s`, `7m05s`, `3h12m`, `2d04h`."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
