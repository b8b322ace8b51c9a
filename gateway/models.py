"""Value types that travel between the modules.

They are immutable because they cross the store's boundary. `Reading` (one per MQTT
message) and `Point` (one per leased row) are named tuples: half the cost of a frozen
dataclass to build (0.25 vs 0.55 us here), on the two hottest paths of the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

# The largest device or datastream id the gateway accepts. The import contract says only
# "integers" (blynk-import-api.md, section 1) and documents no range; Blynk's ids are
# positive, and a signed 64-bit integer is the most a JSON integer, a Java long and an
# SQLite INTEGER all hold. Anything larger is refused at ingest (`id_out_of_range`).
MAX_BLYNK_ID = 2**63 - 1


class Reading(NamedTuple):
    """One point for one Blynk datastream.

    `value_json` is the value already encoded as the JSON text the cloud will receive, so the
    store keeps it verbatim and the uploader splices it into the request body without a
    decode/encode round trip.
    """

    device_id: int
    datastream_id: int
    ts_ms: int
    value_json: str


class ProvisionalReading(Reading):
    """A reading stamped while the wall clock was not trusted: its `ts_ms` is this boot's
    CLOCK_BOOTTIME in ms, not epoch ms. The store holds it apart until the clock
    synchronizes and gives it its wall time (store/provisional.py); nothing uploads it."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class StreamKey:
    """A (device, datastream) pair: the unit of one import/batch request."""

    device_id: int
    datastream_id: int

    def __str__(self) -> str:
        return f"{self.device_id}/{self.datastream_id}"


class Point(NamedTuple):
    """A buffered reading as the uploader sees it; the store finds it again by its value."""

    ts_ms: int
    value_json: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Points of one stream leased from the store for one upload attempt.

    `window_ms` > 0: each point is one closed window of a sampled stream, stamped with the
    window's start (gateway/sampling.py); the store then deletes or dead-letters the raw
    readings of those windows instead of rows equal to the points. Splitting or filtering
    a batch keeps it.
    """

    stream: StreamKey
    points: tuple[Point, ...]
    window_ms: int = 0

    def __len__(self) -> int:
        return len(self.points)

    def with_points(self, points: tuple[Point, ...]) -> Batch:
        """The same stream (and windows) with these of its points."""
        return replace(self, points=points)

    def split(self) -> tuple[Batch, Batch]:
        """Halves, for bisecting a batch the cloud refused because of some of its points."""
        middle = len(self.points) // 2
        return self.with_points(self.points[:middle]), self.with_points(self.points[middle:])

    def take(self, count: int) -> Batch:
        return self.with_points(self.points[:count])
