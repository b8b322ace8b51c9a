"""What the pass-through reservations have not used, in RAM that outlives the process.

The ledger counts pass-through quota ahead, a minute of a device's traffic at a time
(reservations.py), with one fsynced write a minute. After a `kill -9` or a watchdog
restart, that write alone cannot tell how much of the reservation the cloud really took,
so the unused part used to stay counted: up to a minute of every busy device's traffic,
held back from its day.

This journal tells. It is a small file on a RAM file system (systemd's
`RuntimeDirectory=`, otherwise /dev/shm), rewritten (temporary file and rename) whenever
the unused amounts change: after each reservation commits, and after each pass-through
request the cloud accepted, *before* its readings are acknowledged to the broker. It is
never synced and costs the SD card nothing. The next start in the same boot gives back
exactly what the journal says was unused, so a crash strands nothing: a request in flight
at the kill was not acknowledged, its readings come back from the broker and are sent
and counted again, as on the buffered path (which counts at delete time).

It is trusted only when it is certainly current:
- the boot id matches: a power cut empties RAM, and a journal on a disk that survived a
  reboot may lag the file (then the reservations stay counted: the safe side);
- the epoch matches the one in the buffer's `meta` table, bumped by every transaction
  that changes reservations. A kill between such a commit and the journal's rewrite leaves
  an older epoch, and nothing is given back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gateway.log import get_logger

log = get_logger("store")

# Without systemd's RuntimeDirectory=: a RAM file system every Linux has.
FALLBACK_DIR = Path("/dev/shm")

Unused = dict[tuple[int, str], int]  # (device, quota day) -> points reserved, not used


def journal_path(db_path: Path, runtime_dir: str | None) -> Path:
    """Where the journal of the buffer at `db_path` lives: one per buffer file, so two
    gateways (or tests) on one box never share one."""
    directory = Path(runtime_dir.split(":")[0]) if runtime_dir else FALLBACK_DIR
    digest = hashlib.sha256(str(db_path.resolve()).encode()).hexdigest()[:16]
    return directory / f"blynk-gateway-quota-{digest}.json"


@dataclass(frozen=True)
class JournalEntry:
    boot_id: str
    epoch: int
    unused: Unused


class QuotaJournal:
    def __init__(self, path: Path, boot_id: str) -> None:
        self.path = path
        self._boot_id = boot_id
        # A boot id we could not read matches every other unknown one: never trust it.
        self.enabled = not boot_id.startswith("unknown")
        self._failed_logged = False

    def write(self, epoch: int, unused: Unused) -> None:
        """Replace the journal (atomically: a kill leaves the old one or the new one)."""
        if not self.enabled:
            return
        record = {
            "boot_id": self._boot_id,
            "epoch": epoch,
            "unused": [[device, day, points] for (device, day), points in unused.items()],
        }
        temporary = self.path.with_name(self.path.name + ".tmp")
        try:
            temporary.write_text(json.dumps(record, separators=(",", ":")))
            os.replace(temporary, self.path)
        except OSError as exc:
            self._failed(exc)

    def read(self) -> JournalEntry | None:
        """The journal, if there is one and it is readable."""
        if not self.enabled:
            return None
        try:
            if self.path.stat().st_uid != os.getuid():
                # /dev/shm is shared: a file someone else put there is not ours to trust.
                log.warning("quota_journal_not_ours", path=str(self.path))
                return None
            record = json.loads(self.path.read_text())
            unused = {(int(d), str(day)): int(p) for d, day, p in record["unused"]}
            return JournalEntry(str(record["boot_id"]), int(record["epoch"]), unused)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("quota_journal_unreadable", path=str(self.path), error=str(exc))
            return None

    def trusted(self, entry: JournalEntry, epoch: int) -> str | None:
        """None if `entry` may be given back against the buffer's `epoch`, else why not."""
        if entry.boot_id != self._boot_id:
            return "other_boot"
        if entry.epoch != epoch:
            return "stale"
        return None

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _failed(self, exc: OSError) -> None:
        """A journal we cannot rewrite may say more is unused than is: remove it, so the
        next start gives back nothing rather than too much."""
        self.remove()
        if self.path.exists():  # could not even remove it: stop trusting this mechanism
            self.enabled = False
        if not self._failed_logged:
            self._failed_logged = True
            log.warning(
                "quota_journal_failed",
                path=str(self.path),
                error=str(exc),
                consequence="a crash strands the unused pass-through reservations",
            )
