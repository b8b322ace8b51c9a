"""The clock's trust, its steps and this boot's time (gateway/clock.py), and `[clock]`."""

from __future__ import annotations

import io
import re
import textwrap
import uuid
from pathlib import Path

import pytest

from gateway.clock import (
    STEP_MIN_MS,
    Clock,
    ClockSettings,
    KernelNtpState,
    SynchronizedFile,
    read_boot_id,
    system_boottime_ms,
    system_wall_ms,
)
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.testing.clocks import FakeTime, SyncSwitch
from harness import events

HOUR_MS = 3_600_000

CONFIG = """
[cloud]
server = "http://127.0.0.1:8080"
client_id = "gw-client"
client_secret = "s3cret-value"

[[routes]]
topic = "sensors/boiler/temperature"
device_id = 101
datastream_id = 5
"""


def load(tmp_path: Path, clock_section: str) -> ClockSettings:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(CONFIG) + "\n[clock]\n" + textwrap.dedent(clock_section))
    return load_settings(path).clock


# --------------------------------------------------------------------------- [clock]
def test_clock_settings_default_to_the_kernel_and_keeping(tmp_path: Path) -> None:
    settings = load(tmp_path, "")
    assert settings == ClockSettings()
    assert settings.trust == "auto"
    assert settings.synchronized_file == Path("/run/systemd/timesync/synchronized")
    assert settings.unsynced_boot == "keep"
    custom = load(
        tmp_path,
        'trust = "file"\nsynchronized_file = "/run/x"\nunsynced_boot = "dead-letter"\n',
    )
    assert (custom.trust, custom.synchronized_file, custom.unsynced_boot) == (
        "file",
        Path("/run/x"),
        "dead-letter",
    )


@pytest.mark.parametrize(
    ("section", "named"),
    [
        ('trust = "sometimes"\n', "clock.trust"),
        ('unsynced_boot = "drop"\n', "clock.unsynced_boot"),
        ('trsut = "always"\n', "clock.trsut: unknown key"),
    ],
)
def test_bad_clock_settings_name_the_key(tmp_path: Path, section: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, section)
    assert re.search(rf"^{re.escape(named)}", str(info.value), re.M), str(info.value)


# --------------------------------------------------------------------------- the sources
def test_the_kernel_source_reads_this_machine() -> None:
    """adjtimex(modes=0) needs no privilege. This machine runs no NTP daemon (a
    container): the kernel says unsynchronized, which `auto` must report as such."""
    synchronized, problem = KernelNtpState().read()
    assert problem is None
    assert synchronized is False


def test_the_file_source_follows_the_file(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    source = SynchronizedFile(flag)
    assert source.read() == (False, None)
    flag.touch()
    assert source.read() == (True, None)


def test_boot_id_and_boottime_are_this_boots() -> None:
    boot_id = read_boot_id()
    assert boot_id is not None and uuid.UUID(boot_id)
    assert read_boot_id() == boot_id
    assert read_boot_id(Path("/nonexistent/boot_id")) is None
    boottime = system_boottime_ms()
    assert 0 < boottime < system_wall_ms()


def test_always_is_trusted_and_never_asks() -> None:
    clock = Clock.from_settings(ClockSettings(trust="always"))
    assert clock.always
    assert clock.check() is True and clock.trusted


# --------------------------------------------------------------------------- trust and steps
def test_trust_is_rechecked_at_most_once_per_interval() -> None:
    now = [0.0]
    sync = SyncSwitch()
    fake = FakeTime()
    clock = Clock(
        sync,
        wall_ms=fake.wall_ms,
        boottime_ms=fake.boottime_ms,
        boot_id="b",
        monotonic=lambda: now[0],
    )
    assert clock.check() is False
    sync.synchronized = True
    now[0] = 0.5
    assert clock.check() is False and sync.reads == 1  # the cached answer
    now[0] = 1.0
    assert clock.check() is True and clock.trusted and sync.reads == 2
    assert clock.check(force=True) is True and sync.reads == 3


def test_a_step_either_way_is_counted_and_slewing_is_not(log_output: io.StringIO) -> None:
    sync = SyncSwitch(synchronized=True)
    fake = FakeTime()
    clock = fake.clock(sync)
    clock.check()
    fake.step(STEP_MIN_MS // 2)  # within what slewing and rounding may do
    clock.check()
    assert clock.steps == 0
    fake.step(-HOUR_MS)
    clock.check()
    # The two clocks are read a moment apart: a millisecond either way.
    assert clock.steps == 1 and abs(clock.last_step_ms + HOUR_MS) <= 2
    fake.advance(10 * HOUR_MS)  # time passing moves both clocks: no step
    clock.check()
    fake.step(3 * 24 * HOUR_MS)
    clock.check()
    assert clock.steps == 2 and abs(clock.last_step_ms - 3 * 24 * HOUR_MS) <= 2
    stepped = events(log_output, "clock_stepped")
    assert [round(line["delta_s"]) for line in stepped] == [-3600, 259200]


def test_unsynchronized_is_said_once_per_streak_with_the_setting_to_change(
    log_output: io.StringIO,
) -> None:
    sync = SyncSwitch()
    clock = FakeTime().clock(sync)
    for _ in range(5):
        clock.check()
    sync.synchronized = True
    clock.check()
    sync.synchronized = False
    clock.check()
    clock.check()
    lines = events(log_output, "clock_unsynchronized")
    assert len(lines) == 2
    assert "[clock] trust" in lines[0]["hint"]
    assert lines[0]["source"] == "test" and lines[0]["boot_id"] == clock.boot_id
    assert "uploads wait" in lines[0]["action"]


def test_a_source_that_cannot_be_read_is_untrusted_and_said_once(
    log_output: io.StringIO,
) -> None:
    sync = SyncSwitch(synchronized=True)
    sync.problem = "adjtimex failed: errno 1"
    clock = FakeTime().clock(sync)
    assert clock.check() is False
    assert clock.check() is False
    failed = events(log_output, "clock_source_failed")
    assert len(failed) == 1 and failed[0]["error"] == "adjtimex failed: errno 1"
    assert "[clock] trust" in failed[0]["hint"]
