"""Whether the system clock can be trusted, and a time that stays right when it cannot.

A Raspberry Pi has no battery-backed clock: it boots at the time fake-hwclock saved at the
last shutdown (or the image's build date) and jumps to the right time only when NTP
synchronizes, which on an offline gateway can be hours or days later. Within one boot,
though, CLOCK_BOOTTIME always runs right (it counts from the boot, suspend included, and
no one sets it), so a reading stamped with (boot id, CLOCK_BOOTTIME) gets its true time
back once the wall clock is right: wall = boottime + (wall - boottime at the sync).

`Clock` answers, cheaply and from one place (ingest, store and uplink share it):
- is the wall clock trusted now? The source is `[clock] trust`: the kernel's NTP state
  ("auto": adjtimex without STA_UNSYNC), a file systemd-timesyncd keeps ("file"), or
  "always". `check()` asks it at most once per RECHECK_S and keeps the answer in
  `trusted`, a plain attribute the hot path reads for free.
- did it step? A step shows as a change of CLOCK_REALTIME - CLOCK_BOOTTIME beyond what
  slewing (at most 500 ppm) explains; `steps` counts them, so a reader notices one by
  comparing a number.
- this boot's id (/proc/sys/kernel/random/boot_id) and CLOCK_BOOTTIME.

Everything it reads is injectable (`wall_ms`, `boottime_ms`, `boot_id`, the source), so
tests drive it with fake clocks and a switch (gateway/testing/clocks.py).
"""

from __future__ import annotations

import ctypes
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict

from gateway.log import get_logger

log = get_logger("clock")

TrustMode = Literal["auto", "file", "always"]
UnsyncedBootPolicy = Literal["keep", "dead-letter"]

# The sync source is asked at most this often (a syscall or a stat: cheap, not free).
RECHECK_S = 1.0
# A change of REALTIME - BOOTTIME larger than this, plus what slewing could do since the
# last look, is a step. NTP slews at most 500 ppm (0.5 ms per second).
STEP_MIN_MS = 1000
SLEW_PER_MS = 0.0005
BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")
# <sys/timex.h>: the kernel's "clock not synchronized" status bit.
STA_UNSYNC = 0x0040
# Shown once when the clock is not trusted (a log field of at most 120 characters).
TRUST_HINT = '[clock] trust = "always" on a box with a real-time clock; "file" with timesyncd'


class ClockSettings(BaseModel):
    """`[clock]`: how the gateway knows the system clock is right (README "Data safety")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # "auto": the kernel's NTP state (adjtimex: not STA_UNSYNC), which systemd-timesyncd,
    # chrony and ntpd all set; "file": synchronized while `synchronized_file` exists
    # (systemd-timesyncd writes it); "always": trust the clock (an RTC or GPS clock).
    trust: TrustMode = "auto"
    synchronized_file: Path = Path("/run/systemd/timesync/synchronized")
    # Provisional readings of a boot whose clock never synchronized: "keep" them with the
    # best estimate (flagged), or "dead-letter" them (reason `clock_unknown`).
    unsynced_boot: UnsyncedBootPolicy = "keep"


class SyncSource(Protocol):
    """Says whether the wall clock is synchronized; `name` is what `status` shows."""

    name: str
    # What "not synchronized" means for this source, for the log.
    unsynchronized: str

    def read(self) -> tuple[bool, str | None]:
        """(synchronized, why it could not tell or None); never raises."""
        ...


class AlwaysSynchronized:
    """`trust = "always"`: a box with a real-time clock or GPS time."""

    name = "always"
    unsynchronized = ""

    def read(self) -> tuple[bool, str | None]:
        return True, None


class SynchronizedFile:
    """`trust = "file"`: synchronized while the file exists (systemd-timesyncd's flag)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unsynchronized = f"{path} does not exist"

    def read(self) -> tuple[bool, str | None]:
        try:
            self.path.stat()
        except FileNotFoundError:
            return False, None
        except OSError as exc:
            return False, f"cannot look at {self.path}: {exc.strerror or exc}"
        return True, None


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    """`struct timex` (<sys/timex.h>): `long` is the word size, so one layout fits both
    32-bit and 64-bit Linux; the padding is the kernel's own."""

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("padding", ctypes.c_int * 11),
    )


class KernelNtpState:
    """`trust = "auto"`: adjtimex(2) with `modes = 0` (a read, no privilege needed) and
    the STA_UNSYNC bit, which systemd-timesyncd, chrony and ntpd clear once synchronized
    and the kernel sets again after a step or ~9 h without an update."""

    name = "kernel"
    unsynchronized = "the kernel says no NTP daemon has synchronized the clock (STA_UNSYNC)"

    def __init__(self) -> None:
        self._adjtimex: Callable[..., int] | None = None
        self._problem: str | None = None
        try:
            self._adjtimex = ctypes.CDLL(None, use_errno=True).adjtimex
        except (OSError, AttributeError) as exc:
            self._problem = f"adjtimex is not available here ({exc})"

    def read(self) -> tuple[bool, str | None]:
        if self._adjtimex is None:
            return False, self._problem
        timex = _Timex()
        if self._adjtimex(ctypes.byref(timex)) < 0:
            errno = ctypes.get_errno()
            return False, f"adjtimex failed: errno {errno} (a seccomp filter, ProtectClock=?)"
        return not timex.status & STA_UNSYNC, None


def sync_source(settings: ClockSettings) -> SyncSource:
    if settings.trust == "always":
        return AlwaysSynchronized()
    if settings.trust == "file":
        return SynchronizedFile(settings.synchronized_file)
    return KernelNtpState()


def read_boot_id(path: Path = BOOT_ID_PATH) -> str | None:
    """This boot's id (a UUID the kernel draws at boot), or None if it cannot be read."""
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def system_wall_ms() -> int:
    return time.time_ns() // 1_000_000


def system_boottime_ms() -> int:
    """CLOCK_BOOTTIME: since boot, suspend included, never set by anyone."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


class Clock:
    """The wall clock, whether to trust it, its steps, and this boot's own time."""

    def __init__(
        self,
        source: SyncSource,
        *,
        wall_ms: Callable[[], int] = system_wall_ms,
        boottime_ms: Callable[[], int] = system_boottime_ms,
        boot_id: str | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        recheck_s: float = RECHECK_S,
    ) -> None:
        self.source = source
        self.now_ms = wall_ms
        self.boottime_ms = boottime_ms
        if boot_id is None:
            boot_id = read_boot_id()
        # Without one, a restart cannot tell this boot from the next: said at the first check.
        self._boot_id_missing = boot_id is None
        self.boot_id = boot_id or f"unknown-{uuid.uuid4()}"
        self._monotonic = monotonic
        self._recheck_s = recheck_s
        self.trusted = False
        # Steps seen since start, and the last one's size (positive: the clock jumped ahead).
        self.steps = 0
        self.last_step_ms = 0
        self.problem: str | None = None
        self._checked_at: float | None = None
        self._offset_ms: int | None = None
        self._offset_at_boot_ms = 0
        self._unsynced_logged = False

    @classmethod
    def from_settings(
        cls, settings: ClockSettings, wall_ms: Callable[[], int] | None = None
    ) -> Clock:
        return cls(sync_source(settings), wall_ms=wall_ms or system_wall_ms)

    @property
    def always(self) -> bool:
        """Trusted by configuration: nothing is ever provisional, no step is looked for."""
        return isinstance(self.source, AlwaysSynchronized)

    def offset_ms(self) -> int:
        """Wall - boottime now: what turns this boot's boottime into wall time."""
        boottime = self.boottime_ms()
        return self.now_ms() - boottime

    def check(self, *, force: bool = False) -> bool:
        """Ask the source again if RECHECK_S passed (or `force`); look for a step. Returns
        (and keeps in `trusted`) whether the wall clock is trusted now."""
        now = self._monotonic()
        if not force and self._checked_at is not None and now - self._checked_at < self._recheck_s:
            return self.trusted
        self._checked_at = now
        if self.always:
            self.trusted = True
            return True
        self._look_for_step()
        synchronized, problem = self.source.read()
        if self._boot_id_missing:
            self._boot_id_missing = False
            log.warning(
                "clock_boot_id_unavailable",
                path=str(BOOT_ID_PATH),
                action="readings held for the clock by this run are estimated, not "
                "corrected, if the gateway restarts before the clock synchronizes",
            )
        self._note(synchronized, problem)
        self.trusted = synchronized
        return synchronized

    def _look_for_step(self) -> None:
        boottime = self.boottime_ms()
        offset = self.now_ms() - boottime
        previous, since_ms = self._offset_ms, boottime - self._offset_at_boot_ms
        self._offset_ms, self._offset_at_boot_ms = offset, boottime
        if previous is None:
            return
        delta = offset - previous
        if abs(delta) <= STEP_MIN_MS + since_ms * SLEW_PER_MS:
            return
        self.steps += 1
        self.last_step_ms = delta
        log.warning(
            "clock_stepped",
            delta_s=round(delta / 1000, 3),
            synchronized=self.trusted,
            steps=self.steps,
        )

    def _note(self, synchronized: bool, problem: str | None) -> None:
        """One `clock_unsynchronized` line per unsynchronized streak, and one per new
        problem reading the source."""
        if problem is not None and problem != self.problem:
            log.error(
                "clock_source_failed",
                source=self.source.name,
                error=problem,
                hint='set [clock] trust = "file" or "always" if the kernel cannot be asked',
            )
        self.problem = problem
        if synchronized:
            self._unsynced_logged = False
            return
        if not self._unsynced_logged:
            self._unsynced_logged = True
            log.warning(
                "clock_unsynchronized",
                source=self.source.name,
                reason=problem or self.source.unsynchronized,
                boot_id=self.boot_id,
                action="uploads wait; readings without a time of their own are held "
                "(provisional) and get their true time when the clock synchronizes",
                hint=TRUST_HINT,
            )
