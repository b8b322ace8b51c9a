"""The daily point budget, as pure functions of a clock.

Blynk counts points per device per day; the gateway must never send a batch that would
take a device over its limit. Keeping the arithmetic here, free of I/O, lets it be tested
exhaustively (including property-based tests) with an injected clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class DailyQuota:
    limit: int
    timezone: str = "UTC"

    @property
    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def day_of(self, now_ms: int) -> str:
        """The quota day (ISO date in the configured zone) that `now_ms` falls in."""
        return datetime.fromtimestamp(now_ms / 1000, self._zone).date().isoformat()

    def next_reset_ms(self, now_ms: int) -> int:
        """Epoch ms of the next midnight in the configured zone."""
        local = datetime.fromtimestamp(now_ms / 1000, self._zone)
        midnight = datetime.combine(local.date() + timedelta(days=1), datetime.min.time())
        return int(midnight.replace(tzinfo=self._zone).timestamp() * 1000)

    def allowance(self, sent_today: int, exhausted: bool) -> int:
        """How many more points the device may send today."""
        if exhausted:
            return 0
        return max(0, self.limit - sent_today)
