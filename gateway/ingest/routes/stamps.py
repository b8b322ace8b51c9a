"""Receive stamps: the time given to a reading that carries none of its own.

A datastream's stamps must be unique: the buffer keeps one row per (stream, ts, value),
so two equal values on one stamp are stored once (the second counts as a duplicate and
is gone), and the cloud gets one point per stamp. A lone reading gets its arrival time,
moved a millisecond past the stream's last stamp when a burst lands several in one
millisecond. A message that carries several untimed readings for one stream (an `array`
payload, a SenML pack without times) used to get arrival + 1 ms per reading: a 270,000
element flood ran 267 s ahead of the clock, the stream's next readings were stamped after
it, and after a reload or restart (this memory is gone) a new reading on one of those
future stamps with the same value was dropped as a duplicate. Those readings were made
before they arrived, so they now take the latest free milliseconds at or before the
arrival, in their order: never a stamp in the future, never one already used.

When the milliseconds just before the arrival are taken (two big arrays in a row, or
single readings of the same stream among them), the block goes into the free ones below,
possibly before readings that arrived earlier. Keeping arrival order as well is
impossible there without running ahead of the clock, which is what the old rule did; an
untimed reading's millisecond is a convention, not a measurement, so order is what gives.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

# Runs of used stamps remembered per stream. A stream fed single readings a second apart
# keeps its last 32 (~31 s of gaps, ~31,000 free milliseconds between them); the older
# ones are forgotten and nothing at or below them is handed out again. 32 runs are 512
# bytes of arrays per stream.
MAX_RUNS = 32


class UsedStamps:
    """One stream's used stamps, as sorted, disjoint, non-adjacent runs [low, high].

    `floor`: stamps at or below it are never handed out (runs forgotten beyond MAX_RUNS).
    """

    __slots__ = ("floor", "highs", "lows")

    def __init__(self) -> None:
        self.lows = array("q")
        self.highs = array("q")
        self.floor = -1

    @property
    def last(self) -> int:
        return self.highs[-1] if self.highs else self.floor

    def after(self, received_ms: int) -> int:
        """One reading: its arrival, or just after the stream's last stamp (a burst)."""
        last = self.last
        stamp = received_ms if received_ms > last else last + 1
        self.use(stamp, stamp)
        return stamp

    def before(self, count: int, received_ms: int) -> list[int]:
        """`count` stamps, ascending: the latest unused ones at or before the arrival.

        Past the remembered runs (the floor) there is no telling which stamps are free: the
        rest then go after the stream's last stamp, as a burst of single readings does.
        """
        pieces: list[tuple[int, int]] = []  # free ranges taken, latest first
        need = count
        top = received_ms
        index = bisect_right(self.lows, top) - 1  # the last run starting at or before top
        while need and top > self.floor:
            bottom = self.floor + 1
            if index >= 0:
                if self.highs[index] >= top:  # top is inside this run: go below it
                    top = self.lows[index] - 1
                    index -= 1
                    continue
                bottom = self.highs[index] + 1
            taken = min(need, top - bottom + 1)
            pieces.append((top - taken + 1, top))
            need -= taken
            top = bottom - 1
        if need:
            start = max(self.last, pieces[0][1] if pieces else self.last) + 1
            pieces.insert(0, (start, start + need - 1))
        stamps: list[int] = []
        for low, high in reversed(pieces):  # earliest first: gaps filled merge runs
            stamps.extend(range(low, high + 1))
            self.use(low, high)
        return stamps

    def use(self, low: int, high: int) -> None:
        """Mark [low, high] (all unused) as used, merging with the runs it touches."""
        lows, highs = self.lows, self.highs
        index = bisect_right(lows, low)  # the new run goes before lows[index]
        joins_left = index > 0 and highs[index - 1] == low - 1
        joins_right = index < len(lows) and lows[index] == high + 1
        if joins_left and joins_right:
            highs[index - 1] = highs[index]
            del lows[index]
            del highs[index]
        elif joins_left:
            highs[index - 1] = high
        elif joins_right:
            lows[index] = low
        else:
            lows.insert(index, low)
            highs.insert(index, high)
            if len(lows) > MAX_RUNS:
                self.floor = highs[0]
                del lows[0]
                del highs[0]


class ReceiveStamps:
    """The used stamps of every stream that has had a reading without its own time."""

    def __init__(self) -> None:
        self._streams: dict[tuple[int, int], UsedStamps] = {}

    def _used(self, key: tuple[int, int]) -> UsedStamps:
        used = self._streams.get(key)
        if used is None:
            used = self._streams[key] = UsedStamps()
        return used

    def one(self, key: tuple[int, int], received_ms: int) -> int:
        """The stamp of a message's only untimed reading for this stream."""
        return self._used(key).after(received_ms)

    def block(self, key: tuple[int, int], count: int, received_ms: int) -> list[int]:
        """Ascending stamps for a message's `count` untimed readings for this stream."""
        if count == 1:
            return [self.one(key, received_ms)]
        return self._used(key).before(count, received_ms)
