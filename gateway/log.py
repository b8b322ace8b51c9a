"""Structured logging: one event per state change, key=value fields, never a secret.

Under systemd (stdout is not a TTY) events are JSON lines so journald keeps them whole; on
a terminal they are rendered for humans. Secrets are removed twice: any field whose name
looks secret is masked, and the literal values of configured secrets are scrubbed from
every string, so a secret cannot leak through an exception message either.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, MutableMapping
from typing import Any, Literal, TextIO

import structlog

LogFormat = Literal["auto", "json", "console", "logfmt"]

_SECRET_FIELD_PARTS = ("secret", "password", "token", "authorization")
_MASK = "***"


class SecretScrubber:
    """A structlog processor that masks secret-looking fields and known secret values."""

    def __init__(self) -> None:
        self._secret_values: set[str] = set()

    def register(self, *values: str | None) -> None:
        """Remember secret values (e.g. the client secret) so they are scrubbed everywhere."""
        for value in values:
            if value and len(value) >= 4:
                self._secret_values.add(value)

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


def configure(
    level: str = "info",
    log_format: LogFormat = "auto",
    stream: TextIO | None = None,
    secrets: Iterable[str | None] = (),
) -> None:
    """Set up structlog for the process; safe to call again (e.g. on reload or in tests)."""
    out = stream if stream is not None else sys.stdout
    scrubber.register(*secrets)
    if log_format == "auto":
        log_format = "console" if out.isatty() else "json"
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    elif log_format == "logfmt":
        renderer = structlog.processors.LogfmtRenderer(key_order=["timestamp", "level", "event"])
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    # Tracebacks become a string field (then scrubbed like any other); the console renderer
    # formats them itself.
    exceptions: list[Any] = (
        [] if log_format == "console" else [structlog.processors.format_exc_info]
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *exceptions,
            scrubber,
            renderer,
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
