"""What the running gateway knows about itself, for `blynk-gateway status` and `/metrics`.

One snapshot feeds both, so the status table and the scraped numbers never disagree. Its
live half (MQTT link, cloud link, counters, rates) exists only in the daemon's memory and
reaches `status` over the status socket (`gateway/ops/status_socket.py`); nothing of it is
written to the SD card. Its database half is cheap on purpose (an index seek per stream,
today's quota rows, dead letters by reason) because metrics are scraped every few seconds;
the full backlog histogram and the forecast are left to `status`, which reads the file on
its own connection.

Upload outcomes reach this module through the flush loop's `upload_observer` hook, so
the cloud link's history (online since, last success, last error) and the upload duration
histogram need nothing from the flush loop's internals.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway import __version__
from gateway.errors import (
    AuthFailed,
    BatchRejected,
    CloudServerError,
    ConnectFailed,
    QuotaRefused,
    RateLimited,
    TooOld,
    UnknownTarget,
    WrongRegion,
)
from gateway.log import clip_keys
from gateway.models import Batch
from gateway.ops.overflow import OverflowWatch
from gateway.sampling import DeadbandRule, Rule, WindowRule
from gateway.store.inspection import StreamHead
from gateway.uplink.quota import DailyQuota

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.ingest import MqttIngest
    from gateway.store import Store
    from gateway.uplink import FlushLoop

# Upload duration histogram buckets, seconds (a batch is one small HTTPS request).
UPLOAD_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Rates are measured over this window, from samples taken every RATE_SAMPLE_S.
RATE_WINDOW_S = 300.0
RATE_SAMPLE_S = 10.0
# Unmapped device names reported (the most frequent); the full count is in the total.
UNMAPPED_SHOWN = 20

# How each upload failure is named (the `outcome` label of uploads_total).
_OUTCOMES: tuple[tuple[type[BaseException], str], ...] = (
    (ConnectFailed, "unreachable"),
    (CloudServerError, "server_error"),
    (RateLimited, "rate_limited"),
    (AuthFailed, "auth_failed"),
    (WrongRegion, "wrong_region"),
    (UnknownTarget, "not_found"),
    (QuotaRefused, "quota_refused"),
    (TooOld, "too_old"),
    (BatchRejected, "rejected"),
)
# Outcomes that say the cloud answered as it should (it is up, the data is the problem).
_CLOUD_UP = frozenset({"ok", "not_found", "quota_refused", "too_old", "rejected"})


def upload_outcome(error: BaseException | None) -> str:
    """The label of one upload: `ok`, or what went wrong (stable names, for dashboards)."""
    if error is None:
        return "ok"
    for kind, name in _OUTCOMES:
        if isinstance(error, kind):
            return name
    return "no_answer"


def device_rates(rates: dict[str, float], prefix: str) -> dict[int, float]:
    """Per device, the rates of the counters named `<prefix><device id>`."""
    return {
        int(name.removeprefix(prefix)): rate
        for name, rate in rates.items()
        if name.startswith(prefix) and name.removeprefix(prefix).isdigit()
    }


def sampling_in_force(ingest: MqttIngest | None) -> dict[str, dict[str, Any]]:
    """The rules streams meet, as plain data (`describe_rule`), keyed "device/datastream"."""
    if ingest is None:
        return {}
    return {
        str(key): describe_rule(rule, fitted)
        for key, (rule, fitted) in ingest.sampling_in_force().items()
    }


def describe_rule(rule: Rule | None, fitted: bool) -> dict[str, Any]:
    """A `sample` rule as `status` shows it (and `--json` prints it)."""
    entry: dict[str, Any] = {"rule": "raw", "fit": fitted}
    if isinstance(rule, WindowRule):
        entry |= {
            "rule": rule.describe() + (" (fit)" if fitted else ""),
            "window_s": rule.window_ms / 1000,
            "aggregate": rule.aggregate,
            "grace_s": rule.grace_ms / 1000,
        }
    elif isinstance(rule, DeadbandRule):
        entry |= {
            "rule": rule.describe(),
            "deadband": rule.deadband,
            "heartbeat_s": None if rule.heartbeat_ms is None else rule.heartbeat_ms / 1000,
        }
    return entry


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Histogram:
    """Cumulative-bucket histogram, as Prometheus wants it, without depending on it here."""

    bounds: tuple[float, ...] = UPLOAD_BUCKETS_S
    counts: list[int] = field(default_factory=lambda: [0] * (len(UPLOAD_BUCKETS_S) + 1))
    total: float = 0.0
    count: int = 0

    def observe(self, value: float) -> None:
        index = next((i for i, bound in enumerate(self.bounds) if value <= bound), -1)
        self.counts[index] += 1
        self.total += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, observations <= it) including "+Inf"."""
        running = 0
        result = []
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            result.append((bound, running))
        return result


class UploadLog:
    """Receives every upload attempt from the flush loop (its `upload_observer` hook)."""

    def __init__(self, clock_ms: Callable[[], int] = wall_ms) -> None:
        self._clock_ms = clock_ms
        self.outcomes: Counter[str] = Counter()
        self.duration = Histogram()
        self.delivered_by_device: Counter[int] = Counter()
        self.cloud_up: bool | None = None  # None: nothing tried yet
        self.since_ms = clock_ms()
        self.last_ok_ms: int | None = None
        self.last_error: str | None = None
        self.last_error_kind: str | None = None
        self.last_error_ms: int | None = None

    def __call__(self, batch: Batch, duration_s: float, error: BaseException | None) -> None:
        if isinstance(error, asyncio.CancelledError):
            return  # shutdown, not an outcome
        outcome = upload_outcome(error)
        now_ms = self._clock_ms()
        self.outcomes[outcome] += 1
        self.duration.observe(duration_s)
        up = outcome in _CLOUD_UP
        if up != self.cloud_up:
            self.cloud_up = up
            self.since_ms = now_ms
        if outcome == "ok":
            self.last_ok_ms = now_ms
            self.delivered_by_device[batch.stream.device_id] += len(batch)
        else:
            self.last_error = f"{type(error).__name__}: {error}"[:300]
            self.last_error_kind = outcome
            self.last_error_ms = now_ms


class RateMeter:
    """Counters sampled every RATE_SAMPLE_S; rates over the last RATE_WINDOW_S."""

    def __init__(self, window_s: float = RATE_WINDOW_S, sample_s: float = RATE_SAMPLE_S) -> None:
        self._samples: deque[tuple[float, dict[str, int]]] = deque(
            maxlen=int(window_s / sample_s) + 1
        )

    def sample(self, counters: dict[str, int], now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, dict(counters)))

    def span_s(self) -> float:
        """How long the rates are measured over (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        return self._samples[-1][0] - self._samples[0][0]

    def rates(self) -> dict[str, float]:
        """Per second, for every counter in the newest sample (absent before: it was 0)."""
        if len(self._samples) < 2:
            return {}
        (t0, first), (t1, last) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return {}
        return {
            name: round(max(0, last[name] - first.get(name, 0)) / (t1 - t0), 3) for name in last
        }


@dataclass(frozen=True)
class LiveState:
    """The daemon's in-memory state: JSON over the status socket, labels in /metrics."""

    pid: int
    version: str
    db: str
    started_at_ms: int
    now_ms: int
    mqtt_connected: bool
    broker: str
    cloud: str
    cloud_online: bool
    # since when online/offline (the first upload that went the other way, or the start)
    cloud_since_ms: int
    last_upload_ok_ms: int | None
    last_error: str | None
    last_error_kind: str | None
    last_error_ms: int | None
    buffered_points: int
    disk_full: bool
    holding_acks: bool
    # since start: received, stored, duplicate, rejected, expired, evicted, refused,
    # delivered, dead_lettered, and sampling's suppressed, late, aggregated (the outcomes
    # of readings_total)
    readings: dict[str, int]
    rejected_by_reason: dict[str, int]
    uploads: dict[str, int]
    upload_duration: list[tuple[str, int]]
    upload_duration_sum_s: float
    unmapped_devices: dict[str, int]
    unmapped_devices_total: int
    # today's quota points reserved ahead for pass-through and not used yet, per device
    # (str keys: this travels as JSON); the ledger on disk counts them already
    quota_reserved_today: dict[str, int]
    rates_per_s: dict[str, float]
    # "device/datastream" -> the `sample` rule its readings meet (gateway/sampling.py), with
    # whether `fit` chose the window: what `status` shows as in force
    sampling: dict[str, dict[str, Any]] = field(default_factory=dict)
    # whether the clock is trusted and what waits for it (store/timekeeping.py `report`)
    clock: dict[str, Any] | None = None
    # the organization's request budget (uplink/budget.py): requests started in the last
    # 60 s, and cloud.max_requests_per_minute
    cloud_requests_last_minute: int = 0
    cloud_requests_per_minute_limit: int = 0
    # pass-through: "on", "paused" (writing first: the broker's window or the budget is the
    # limit), "closed" (buffered readings or the cloud unreachable) or "off" (configured)
    pass_through: str = "off"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Snapshot:
    """Live state plus the cheap database facts: everything `/metrics` exports."""

    live: LiveState
    streams: list[StreamHead]
    quota_day: str
    quota_used: dict[int, int]
    quota_exhausted: dict[int, bool]
    daily_points_limit: int
    dead_letters: dict[str, int]
    evicted_by_device: dict[int, int]
    refused_by_device: dict[int, int]
    db_file_bytes: int

    @property
    def oldest_ts_ms(self) -> int | None:
        return min((head.oldest_ts_ms for head in self.streams), default=None)


class ObservedGateway(Protocol):
    """What status and metrics read of the running gateway, and nothing it could change:
    the settings in force and its three parts (None until each has started)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> Store | None: ...

    @property
    def ingest(self) -> MqttIngest | None: ...

    @property
    def flush(self) -> FlushLoop | None: ...

    def clock_report(self) -> dict[str, Any] | None: ...


class Observer:
    """Reads a running gateway from outside: its store, ingest, flush loop and uploads."""

    def __init__(self, gateway: ObservedGateway, clock_ms: Callable[[], int] = wall_ms) -> None:
        self._gateway = gateway
        self._clock_ms = clock_ms
        self.started_at_ms = clock_ms()
        self.uploads = UploadLog(clock_ms)
        self.rates = RateMeter()
        self.overflow = OverflowWatch()

    def counters(self) -> dict[str, int]:
        """The readings counters since start (the `outcome` label of readings_total)."""
        ingest, flush = self._gateway.ingest, self._gateway.flush
        counts: dict[str, int] = {}
        if ingest is not None:
            stats = ingest.stats
            counts |= {
                "received": stats.received,
                "stored": stats.stored,
                "duplicate": stats.duplicates,
                "rejected": stats.rejected,
                "evicted": stats.evicted,
                "refused": stats.refused,
                "expired": stats.expired,  # too old on arrival
                # sampling (issue 19): dropped by a deadband, refused for a window sent
                "suppressed": stats.suppressed,
                "late": stats.late,
            }
        if flush is not None:
            counts["delivered"] = flush.stats.delivered
            counts["dead_lettered"] = flush.stats.dead_lettered
            counts["expired"] = counts.get("expired", 0) + flush.stats.expired
        store = self._gateway.store
        if store is not None:  # readings folded into window points the cloud took
            counts["aggregated"] = store.sampling.aggregated
            counts["late"] = counts.get("late", 0) + store.sampling.late
        return counts

    def sample_rates(self, now: float | None = None) -> None:
        counts = self.counters()
        counts |= {f"delivered_device_{d}": n for d, n in self.uploads.delivered_by_device.items()}
        ingest = self._gateway.ingest
        if ingest is not None:  # per device: readings arriving, points they will become
            counts |= {
                f"arriving_device_{d}": n for d, n in ingest.stats.arriving_by_device.items()
            }
            counts |= {f"sending_device_{d}": n for d, n in ingest.stats.sending_by_device.items()}
        self.rates.sample(counts, now)
        self._forecast_overflow()

    def _forecast_overflow(self) -> None:
        """`quota_overflow_forecast` for devices without a `sample` rule (ops/overflow.py)."""
        gateway = self._gateway
        if gateway.ingest is None:
            return
        cloud = gateway.settings.cloud
        day = DailyQuota(cloud.daily_points_limit, cloud.day_timezone).day_of(self._clock_ms())
        self.overflow.check(
            device_rates(self.rates.rates(), "arriving_device_"),
            observed_s=self.rates.span_s(),
            plan=gateway.ingest.routes.sampling,
            sampled=gateway.ingest.stats.sampled_devices,
            day=day,
        )

    async def sample_forever(self) -> None:
        """The rate sampler (a named task of the daemon): memory only, never the disk."""
        while True:
            self.sample_rates()
            await asyncio.sleep(RATE_SAMPLE_S)

    def live(self) -> LiveState:
        gateway = self._gateway
        settings = gateway.settings
        ingest, store, uploads = gateway.ingest, gateway.store, self.uploads
        flush = gateway.flush
        online = flush.uplink.online if flush is not None else False
        unmapped = ingest.stats.unmapped_devices if ingest is not None else Counter[str]()
        return LiveState(
            pid=os.getpid(),
            version=__version__,
            db=str(settings.store.path),
            started_at_ms=self.started_at_ms,
            now_ms=self._clock_ms(),
            mqtt_connected=ingest is not None and ingest.connected.is_set(),
            broker=f"{settings.mqtt.host}:{settings.mqtt.port}",
            cloud=settings.cloud.server,
            cloud_online=online,
            cloud_since_ms=uploads.since_ms,
            last_upload_ok_ms=uploads.last_ok_ms,
            last_error=uploads.last_error,
            last_error_kind=uploads.last_error_kind,
            last_error_ms=uploads.last_error_ms,
            buffered_points=store.pending_points if store is not None else 0,
            disk_full=store is not None and store.disk_full,
            holding_acks=ingest is not None and ingest.holding,
            readings=self.counters(),
            rejected_by_reason=dict(ingest.stats.rejected_by_reason) if ingest else {},
            uploads=dict(uploads.outcomes),
            upload_duration=uploads.duration.cumulative(),
            upload_duration_sum_s=round(uploads.duration.total, 6),
            unmapped_devices=clip_keys(unmapped.most_common(UNMAPPED_SHOWN)),
            unmapped_devices_total=len(unmapped),
            quota_reserved_today=self._reserved_today(),
            rates_per_s=self.rates.rates(),
            sampling=sampling_in_force(ingest),
            clock=gateway.clock_report(),
            cloud_requests_last_minute=flush.budget.requests_last_minute() if flush else 0,
            cloud_requests_per_minute_limit=settings.cloud.max_requests_per_minute,
            pass_through=self._pass_through_state(),
        )

    def _pass_through_state(self) -> str:
        store, settings = self._gateway.store, self._gateway.settings
        if not settings.flush.pass_through:
            return "off"
        if store is not None and store.staging.paused:
            return "paused"
        return "on" if store is not None and store.staging.open else "closed"

    def _reserved_today(self) -> dict[str, int]:
        store, cloud = self._gateway.store, self._gateway.settings.cloud
        if store is None:
            return {}
        day = DailyQuota(cloud.daily_points_limit, cloud.day_timezone).day_of(self._clock_ms())
        return {str(device): points for device, points in store.reserved_quota_day(day).items()}

    async def snapshot(self) -> Snapshot:
        """Live state and the cheap database facts, from the daemon's own connection."""
        store = self._gateway.store
        if store is None:
            raise RuntimeError("the gateway has not opened its buffer yet")
        cloud = self._gateway.settings.cloud
        quota = DailyQuota(cloud.daily_points_limit, cloud.day_timezone)
        day = quota.day_of(self._clock_ms())
        ledger = await store.quota_day(day)
        drops = await store.capacity_drops()
        return Snapshot(
            live=self.live(),
            streams=await store.stream_heads(),
            quota_day=day,
            quota_used={device: points for device, (points, _) in ledger.items()},
            quota_exhausted={device: gone for device, (_, gone) in ledger.items()},
            daily_points_limit=cloud.daily_points_limit,
            dead_letters=await store.dead_letter_counts(),
            evicted_by_device={device: evicted for device, (evicted, _) in drops.items()},
            refused_by_device={device: refused for device, (_, refused) in drops.items()},
            db_file_bytes=store.file_bytes(),
        )
