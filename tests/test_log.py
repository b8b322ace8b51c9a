"""Structured logging: JSON/logfmt rendering, secret scrubbing, and the Throttle."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from gateway import log

SECRET = "s3cr3t-value"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """structlog's configuration is process-global: leave it as we found it."""
    yield
    structlog.reset_defaults()


def configure(log_format: Any = "json", level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    log.configure(level, log_format, stream=stream, secrets=[SECRET])
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --------------------------------------------------------------------------- JSON and secrets
def test_json_line_has_event_component_and_no_secrets() -> None:
    stream = configure()
    log.get_logger("x").info(
        "evt", client_secret="abc", note=f"contains {SECRET} inside", token="t", backlog=3
    )
    text = stream.getvalue()
    assert text.count("\n") == 1
    (event,) = lines(stream)
    assert event["event"] == "evt"
    assert event["component"] == "x"
    assert event["level"] == "info"
    assert event["backlog"] == 3
    assert "timestamp" in event
    assert event["client_secret"] == "***"
    assert event["token"] == "***"
    assert event["note"] == "contains *** inside"
    assert SECRET not in text
    assert '"abc"' not in text
    assert '"t"' not in text


@pytest.mark.parametrize(
    "field", ["password", "mqtt_password", "Authorization", "access_token", "refresh_token"]
)
def test_secret_looking_fields_are_masked(field: str) -> None:
    stream = configure()
    log.get_logger("x").info("evt", **{field: "hunter2-value"})
    (event,) = lines(stream)
    assert event[field] == "***"
    assert "hunter2-value" not in stream.getvalue()


@pytest.mark.parametrize("field", ["token_requests", "token_renewals_count", "auth_retry_s"])
def test_counters_and_durations_about_secrets_stay_visible(field: str) -> None:
    stream = configure()
    log.get_logger("x").info("evt", **{field: 42})
    assert lines(stream)[0][field] == 42


def test_secret_in_event_name_and_exception_is_scrubbed() -> None:
    stream = configure()
    logger = log.get_logger("cloud")
    logger.warning(f"failed with {SECRET}", error=RuntimeError(f"401 for {SECRET}"))
    (event,) = lines(stream)
    assert event["event"] == "failed with ***"
    assert event["error"] == "RuntimeError: 401 for ***"
    assert SECRET not in stream.getvalue()


def test_every_configured_secret_is_scrubbed() -> None:
    stream = io.StringIO()
    log.configure("info", "json", stream=stream, secrets=["first-secret", "mqtt-pass-2", None])
    log.get_logger("x").info("evt", a="first-secret/mqtt-pass-2", b="mqtt-pass-2mqtt-pass-2")
    (event,) = lines(stream)
    assert event["a"] == "***/***"
    assert event["b"] == "******"


def test_secrets_nested_in_containers_are_scrubbed() -> None:
    """A dict or list field (e.g. request details) must not carry a secret out either."""
    stream = configure()
    log.get_logger("x").info(
        "evt", details={"note": f"x {SECRET}", "client_secret": "abc-def"}, items=[SECRET]
    )
    text = stream.getvalue()
    assert SECRET not in text
    assert "abc-def" not in text


def test_context_variables_are_scrubbed_too() -> None:
    stream = configure()
    structlog.contextvars.bind_contextvars(password="ctx-pass-word", where=f"at {SECRET}")
    try:
        log.get_logger("x").info("evt")
    finally:
        structlog.contextvars.clear_contextvars()
    (event,) = lines(stream)
    assert event["password"] == "***"
    assert event["where"] == "at ***"


# --------------------------------------------------------------------------- formats and levels
def test_logfmt_renders_key_value() -> None:
    stream = configure("logfmt")
    log.get_logger("flush").info("back_online", backlog=12, note="two words", token="t0k")
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("timestamp=")
    assert " level=info event=back_online " in line
    assert "component=flush" in line
    assert "backlog=12" in line
    assert 'note="two words"' in line
    assert "token=***" in line
    assert "t0k" not in line


def test_auto_format_is_json_when_not_a_tty() -> None:
    stream = configure("auto")
    log.get_logger("x").info("evt", n=1)
    assert lines(stream)[0]["event"] == "evt"


def test_console_format_is_plain_text_without_colors() -> None:
    stream = configure("console")
    log.get_logger("x").info("evt", client_secret="abc-xyz")
    text = stream.getvalue()
    assert "evt" in text
    assert "\x1b[" not in text  # a StringIO is not a terminal
    assert "abc-xyz" not in text


def test_level_filtering() -> None:
    stream = configure(level="warning")
    logger = log.get_logger("x")
    logger.debug("debug_evt")
    logger.info("info_evt")
    logger.warning("warning_evt")
    logger.error("error_evt")
    assert [e["event"] for e in lines(stream)] == ["warning_evt", "error_evt"]
    assert [e["level"] for e in lines(stream)] == ["warning", "error"]


def test_reconfigure_switches_stream() -> None:
    first = configure()
    log.get_logger("x").info("one")
    second = configure()
    log.get_logger("x").info("two")
    assert [e["event"] for e in lines(first)] == ["one"]
    assert [e["event"] for e in lines(second)] == ["two"]


# --------------------------------------------------------------------------- Throttle
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_first_through_then_suppressed_then_counted() -> None:
    clock = FakeClock()
    throttle = log.Throttle(60.0, clock=clock)
    assert throttle.allow("k") == (True, 0)
    for offset in (0.0, 1.0, 30.0, 59.9):
        clock.now = 1000.0 + offset
        assert throttle.allow("k") == (False, 0)
    clock.now = 1060.0  # exactly one interval later
    assert throttle.allow("k") == (True, 4)
    # The count was reported: it starts again from zero.
    clock.now = 1061.0
    assert throttle.allow("k") == (False, 0)
    clock.now = 1200.0
    assert throttle.allow("k") == (True, 1)
    clock.now = 1300.0
    assert throttle.allow("k") == (True, 0)


def test_throttle_keys_are_independent() -> None:
    clock = FakeClock()
    throttle = log.Throttle(10.0, clock=clock)
    assert throttle.allow(("topic/a", "not UTF-8")) == (True, 0)
    assert throttle.allow(("topic/a", "not UTF-8")) == (False, 0)
    assert throttle.allow(("topic/a", "payload is empty")) == (True, 0)
    assert throttle.allow(("topic/b", "not UTF-8")) == (True, 0)
    clock.now += 10
    assert throttle.allow(("topic/a", "not UTF-8")) == (True, 1)
    assert throttle.allow(("topic/a", "payload is empty")) == (True, 0)


def test_throttle_interval_is_measured_from_the_last_logged_line() -> None:
    """Suppressed calls do not push the window forward (or a steady stream never logs)."""
    clock = FakeClock()
    throttle = log.Throttle(10.0, clock=clock)
    assert throttle.allow("k")[0]
    allowed_at = []
    for step in range(1, 40):
        clock.now = 1000.0 + step  # one call per second
        if throttle.allow("k")[0]:
            allowed_at.append(step)
    assert allowed_at == [10, 20, 30]


def test_throttled_logging_end_to_end() -> None:
    stream = configure()
    clock = FakeClock()
    throttle = log.Throttle(60.0, clock=clock)
    logger = log.get_logger("ingest")
    for second in range(0, 130, 10):
        clock.now = 1000.0 + second
        allowed, suppressed = throttle.allow("bad")
        if allowed:
            logger.warning("payload_rejected", suppressed_since_last=suppressed)
    assert [e["suppressed_since_last"] for e in lines(stream)] == [0, 5, 5]


# --------------------------------------------------------------------------- journald
@pytest.fixture
def journal_file(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A real file standing in for journald's stream: $JOURNAL_STREAM names its dev:inode."""
    path = tmp_path / "journal"
    with path.open("w+") as handle:
        stat = os.fstat(handle.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
        yield handle


def journal_lines(handle: Any) -> list[str]:
    handle.flush()
    handle.seek(0)
    return handle.read().splitlines()


def test_under_journald_lines_carry_priority_and_no_timestamp(journal_file: Any) -> None:
    log.configure("debug", "auto", stream=journal_file, secrets=[SECRET])
    logger = log.get_logger("flush")
    logger.debug("probe_sent")
    logger.info("back_online", backlog=12)
    logger.warning("still_offline", failures=3, note=f"with {SECRET}")
    logger.error("went_offline", kind="unreachable")
    logger.critical("giving_up")
    assert journal_lines(journal_file) == [
        "<7>probe_sent component=flush",
        "<6>back_online component=flush backlog=12",
        '<4>still_offline component=flush failures=3 note="with ***"',
        "<3>went_offline component=flush kind=unreachable",
        "<2>giving_up component=flush",
    ]


def test_json_under_journald_keeps_fields_drops_timestamp(journal_file: Any) -> None:
    log.configure("info", "json", stream=journal_file)
    log.get_logger("x").warning("evt", n=1, token="abc")
    (line,) = journal_lines(journal_file)
    assert line.startswith("<4>{")
    event = json.loads(line[3:])
    assert event == {"component": "x", "event": "evt", "n": 1, "token": "***", "level": "warning"}


def test_multi_line_output_under_journald_has_a_prefix_per_line(journal_file: Any) -> None:
    """The console renderer prints tracebacks over several lines: each needs its priority."""
    log.configure("info", "console", stream=journal_file)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.get_logger("x").exception("failed")
    lines_out = journal_lines(journal_file)
    assert len(lines_out) > 3
    assert all(line.startswith("<3>") for line in lines_out)


def test_journal_stream_of_another_file_is_not_journald(journal_file: Any, tmp_path: Any) -> None:
    """A child whose stdout is a pipe or file inherits $JOURNAL_STREAM: it must not prefix."""
    with (tmp_path / "other").open("w+") as other:
        log.configure("info", "auto", stream=other)
        log.get_logger("x").info("evt")
        (line,) = journal_lines(other)
    event = json.loads(line)
    assert event["event"] == "evt"
    assert "timestamp" in event


def test_is_journal_stream_is_false_for_streams_without_a_file() -> None:
    assert not log.is_journal_stream(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
