"""Receive stamps: the time given to a reading that carries none of its own.

A datastream's stamps must be unique: the buffer keeps one row per (stream, ts, value), so
a second equal value on a used stamp is taken for a broker redelivery and dropped, and the
cloud keeps one point per stamp. They must not run ahead of the clock either: a stream's
next reading would be stamped after them, and after a restart (this memory is gone) a new
reading could land on one of them. A lone reading gets its arrival time, or a millisecond
past the stream's last stamp when a burst lands several in one millisecond (a message can
push its stream ahead by one millisecond, never by its size). A message holding several
untimed readings for one stream (an `array`, a SenML pack) was made before it arrived:
its readings take the latest unused milliseconds at or before the arrival, in order.

When those are taken (two big arrays in a row, single readings among them), the block goes
into the free milliseconds below, possibly before readings that arrived earlier: keeping
arrival order as well is impossible there without running ahead of the clock, and an
untimed reading's millisecond is a convention, not a measurement. A restart forgets all
this: an untimed array arriving right after one reaches back past it only if it holds more
readings than the restart took milliseconds.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right

# Runs of used stamps remembered per stream: at least the last REMEMBERED_RUNS, at most
# MAX_RUNS (forgetting in batches keeps a single reading's stamp O(1)). A stream fed single
# readings a second apart thus knows the free milliseconds of its last 32 s or more; the
# older ones are forgotten and nothing at or below them is handed out again. 48 runs are
# 768 bytes of arrays per stream.
REMEMBERED_RUNS = 32
MAX_RUNS = 48


class UsedStamps:
    """One stream's used stamps, as sorted, disjoint, non-adjacent runs [low, high].

    `floor`: stamps at or below it are never handed out (the forgotten runs' highest).
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
        highs = self.highs
        last = highs[-1] if highs else self.floor
        if received_ms > last + 1:  # after a gap: a run of its own, at the end
            self.lows.append(received_ms)
            highs.append(received_ms)
            if len(highs) > MAX_RUNS:
                self._forget_oldest()
            return received_ms
        if highs:
            highs[-1] = last + 1  # right after the last run (a burst): extends it
        else:
            self.use(last + 1, last + 1)
        return last + 1

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
                self._forget_oldest()

    def _forget_oldest(self) -> None:
        forget = len(self.lows) - REMEMBERED_RUNS
        self.floor = self.highs[forget - 1]
        del self.lows[:forget]
        del self.highs[:forget]


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
        used = self._streams.get(key)
        if used is None:
            used = self._streams[key] = UsedStamps()
        return used.after(received_ms)

    def block(self, key: tuple[int, int], count: int, received_ms: int) -> list[int]:
        """Ascending stamps for a message's `count` untimed readings for this stream."""
        if count == 1:
            return [self.one(key, received_ms)]
        return self._used(key).before(count, received_ms)
