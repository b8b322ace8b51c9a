"""`blynk-gateway status`: is my data safe? Read-only, safe while the daemon runs.

Two sources, told apart in the output: the running daemon's live state (cloud and MQTT
links, counters, observed rates), asked over its status socket, and the buffer file read
on a connection of our own (backlog per stream, today's quota, dead letters, evictions),
which works whether the daemon runs or not. From both it forecasts, per device, what the
backlog will lose to the daily quota and the age limit (`gateway.ops.forecast`).

A table for people, `--json` for scripts (same keys as the table's sections). `--json`
prints a JSON document in every case, also when there is nothing to report (no buffer yet,
an unreadable or damaged one, a bad config): the sections it could not fill are null and
`error` says why with a stable code, so a monitoring script can always parse stdout. The
exit code is the command line's: 0 a report, 1 the buffer could not be read, 2 the config.

Its size is bounded whatever the buffer and the daemon hold (issue 16): text from outside
(device names, the cloud's messages) is clipped to ~120 characters on one line
(`gateway.log.clip`), and each per-stream or per-device list keeps its `MAX_ROWS`
largest entries (`<list>_omitted` counts the rest); the table shows `TABLE_ROWS` of them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from gateway.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from gateway.errors import ConfigError, GatewayError, StoreCorrupt, StoreError
from gateway.log import clip, clip_keys
from gateway.ops.forecast import drain_eta_s, forecast_device

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.models import StreamKey
    from gateway.sampling import WindowRule
    from gateway.store import StreamHead
    from gateway.store.provisional import Correction

T = TypeVar("T")

# Backlog histogram resolution for the forecast: an hour of timestamps per bucket.
BUCKET_MS = 3_600_000
# Rows kept per list in the report (the largest), and shown per table.
MAX_ROWS = 1_000
TABLE_ROWS = 50
# Names from outside shown per list (the daemon sends its 20 most frequent).
NAMES_SHOWN = 20
# The cloud's last error message (the daemon keeps 300 characters of it).
ERROR_CHARS = 300


def add_parser(commands: Any) -> None:
    status = commands.add_parser(
        "status",
        help="cloud, MQTT, backlog, quota, what will expire (safe while running)",
    )
    status.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    status.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from gateway.config import load_settings

    if args.json:
        report, exit_code = asyncio.run(collect_json(args.config))
        print(json.dumps(report, indent=2))
        return exit_code
    # The table keeps its one sentence on stderr (cli.main) for what it cannot report.
    from gateway.cli.status_table import render

    print(render(asyncio.run(collect(load_settings(args.config)))))
    return EXIT_OK


class BufferUnavailable(GatewayError):
    """The buffer file cannot be read; `code` is stable (`--json`'s `error.code`)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def collect_json(config: Path) -> tuple[dict[str, Any], int]:
    """`--json`: the report and the exit code, whatever happens (never a bare sentence).

    A config that does not load leaves nothing to ask (not even where the daemon's socket
    is): every section is null. A buffer that cannot be read still gets the daemon's
    live state, if one answers.
    """
    from gateway.config import load_settings

    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return unavailable_report("config_invalid", str(exc)), EXIT_CONFIG
    report = await collect(settings, partial=True)
    return report, EXIT_OK if report["error"] is None else EXIT_FAILURE


def unavailable_report(code: str, message: str, now_ms: int | None = None) -> dict[str, Any]:
    """The `--json` document when not even the config could be read."""
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    return {
        "generated_at": iso(now_ms),
        "error": {"code": code, "message": message},
    } | dict.fromkeys(REPORT_SECTIONS)


def ask_daemon(db_path: Path) -> dict[str, Any] | None:
    """The live state of the daemon that owns `db_path`, or None if none answers."""
    from gateway.ops.status_socket import candidate_paths, query

    wanted = db_path.resolve()
    for path in candidate_paths(db_path):
        answer = query(path)
        if answer is not None and Path(str(answer.get("db", ""))).resolve() == wanted:
            return answer
    return None


@dataclass(frozen=True, slots=True)
class BufferView:
    """What `status` reads from the buffer file, on a connection of its own."""

    heads: list[StreamHead]
    histogram: list[tuple[StreamKey, int, int]]
    ledger: dict[int, tuple[int, bool]]
    dead_letters: dict[str, int]
    drops: dict[int, tuple[int, int]]
    file_bytes: int
    window_rules: dict[StreamKey, WindowRule]  # sampled streams' rules (store/windows.py)
    provisional: int
    last_correction: Correction | None


# Every key of the report, in order; those after `error` are null when unknown.
REPORT_SECTIONS = (
    "daemon",
    "cloud",
    "mqtt",
    "clock",
    "backlog",
    "quota",
    "forecast",
    "drain",
    "dead_letters",
    "evictions",
    "ingest",
    "database",
)


async def read_buffer(path: Path, day: str) -> BufferView:
    """The buffer's figures, or `BufferUnavailable` saying why they cannot be had.

    Checked before opening: `Store.open` would create a missing file (status must not), and
    a permission problem deserves its own words (the unit's buffer is its user's alone).
    """
    from gateway.store import Store

    await asyncio.to_thread(_check_file, path)
    try:
        store = await Store.open(path)
    except StoreCorrupt as exc:
        raise BufferUnavailable("buffer_damaged", str(exc)) from exc
    except (StoreError, OSError) as exc:
        raise BufferUnavailable("buffer_unreadable", f"cannot read {path}: {exc}") from exc
    try:
        return BufferView(
            heads=await store.stream_heads(),
            histogram=await store.backlog_histogram(BUCKET_MS),
            ledger=await store.quota_day(day),
            dead_letters=await store.dead_letter_counts(),
            drops=await store.capacity_drops(),
            file_bytes=store.file_bytes(),
            window_rules=dict(store.sampling.rules),
            provisional=store.provisional_points,
            last_correction=await store.last_correction(),
        )
    except StoreCorrupt as exc:
        raise BufferUnavailable("buffer_damaged", str(exc)) from exc
    except StoreError as exc:
        raise BufferUnavailable("buffer_unreadable", f"cannot read {path}: {exc}") from exc
    finally:
        await store.close()


def _check_file(path: Path) -> None:
    try:
        path.stat()
    except FileNotFoundError:
        raise BufferUnavailable(
            "no_buffer", f"no buffer database at {path} (has the gateway run yet?)"
        ) from None
    except PermissionError as exc:
        raise _permission_denied(path, exc) from None
    if not os.access(path, os.R_OK | os.W_OK):  # WAL readers write the -shm file too
        raise _permission_denied(path, PermissionError("read and write access needed"))


def _permission_denied(path: Path, exc: OSError) -> BufferUnavailable:
    return BufferUnavailable(
        "permission_denied",
        f"cannot read the buffer database {path}: {exc.strerror or exc} (under the systemd "
        "unit it belongs to the service's user: run status with sudo)",
    )


async def collect(
    settings: Settings, now_ms: int | None = None, *, partial: bool = False
) -> dict[str, Any]:
    """The whole report as plain data (what `--json` prints).

    A buffer that cannot be read raises `BufferUnavailable`, or with `partial` gives the
    report without the buffer's sections (null) and `error` set.
    """
    from gateway.uplink.quota import DailyQuota

    path = settings.store.path
    live = await asyncio.to_thread(ask_daemon, path)
    now_ms = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    cloud = settings.cloud
    quota = DailyQuota(cloud.daily_points_limit, cloud.day_timezone)
    day = quota.day_of(now_ms)
    header = {
        "generated_at": iso(now_ms),
        "error": None,
        "daemon": _daemon(live, now_ms),
        "cloud": _cloud(live, settings, now_ms),
        "mqtt": {
            "broker": f"{settings.mqtt.host}:{settings.mqtt.port}",
            "connected": live["mqtt_connected"] if live else None,
        },
        "clock": _clock(live, settings),
    }
    try:
        view = await read_buffer(path, day)
    except BufferUnavailable as exc:
        if not partial:
            raise
        unknown = dict.fromkeys(("backlog", "quota", "forecast", "drain"))
        unknown |= dict.fromkeys(("dead_letters", "evictions"))
        return (
            header
            | {"error": {"code": exc.code, "message": str(exc)}}
            | unknown
            | {
                "ingest": _ingest(live),
                "database": {"path": str(path), "file_bytes": None},
            }
        )
    ledger = view.ledger
    if live:  # the running daemon has counted some points ahead (pass-through)
        reserved = live.get("quota_reserved_today", {})
        ledger = {
            device: (points - reserved.get(str(device), 0), exhausted)
            for device, (points, exhausted) in ledger.items()
        }
    heads, drops = view.heads, view.drops
    window_rules = view.window_rules
    header["clock"] = _clock(live, settings, view)

    per_stream: dict[Any, int] = defaultdict(int)
    per_device_hist: dict[int, dict[Any, list[tuple[int, int]]]] = defaultdict(dict)
    for key, bucket, count in view.histogram:
        per_stream[key] += count
        rule = window_rules.get(key)
        if rule is not None:  # a windowed stream's readings go out as one point per window
            count = min(count, -(-BUCKET_MS // rule.window_ms))
        per_device_hist[key.device_id].setdefault(key, []).append((bucket, count))
    rates = live["rates_per_s"] if live else {}
    max_age_ms = now_ms - cloud.oldest_sendable_ms(now_ms)
    forecasts: list[dict[str, Any]] = []
    for device, streams in sorted(per_device_hist.items()):
        sent, exhausted = ledger.get(device, (0, False))
        # A device whose quota is spent sends nothing until the reset, whatever it did before.
        allowance = quota.allowance(sent, exhausted)
        result = forecast_device(
            list(streams.values()),
            bucket_ms=BUCKET_MS,
            now_ms=now_ms,
            allowance_today=allowance,
            daily_limit=cloud.daily_points_limit,
            next_reset_ms=quota.next_reset_ms(now_ms),
            max_age_ms=max_age_ms,
            newest_first=settings.flush.order == "newest",
        )
        rate = rates.get(f"delivered_device_{device}") if allowance else 0.0
        forecasts.append(
            {
                "device_id": device,
                "backlog": result.backlog,
                "will_send": result.will_send,
                "will_expire": result.will_expire,
                "clears_at": iso(result.clears_at_ms),
                "quota_days": result.days,
                "observed_rate_per_s": rate,
                "eta_at_observed_rate_s": _round(drain_eta_s(result.backlog, rate or 0.0)),
            }
        )
    backlog = sum(per_stream.values())
    oldest = min((head.oldest_ts_ms for head in heads), default=None)
    stream_rows, streams_omitted = largest(
        [_stream_row(head, per_stream.get(head.key, 0), now_ms) for head in heads],
        lambda row: row["readings"],
    )
    quota_rows, quota_omitted = largest(
        [
            {
                "device_id": device,
                "used": used,
                "left": quota.allowance(used, exhausted),
                "refused_by_cloud": exhausted,
            }
            for device, (used, exhausted) in sorted(ledger.items())
        ],
        lambda row: row["used"],
    )
    forecast_rows, forecasts_omitted = largest(
        forecasts, lambda row: (row["will_expire"], row["backlog"])
    )
    drop_rows, drops_omitted = largest(
        [(str(d), {"evicted": e, "refused": r}) for d, (e, r) in drops.items()],
        lambda row: row[1]["evicted"] + row[1]["refused"],
    )
    return header | {
        "backlog": {
            "readings": backlog,
            "oldest": iso(oldest),
            "oldest_age_s": _age_s(oldest, now_ms),
            "streams": stream_rows,
            "streams_omitted": streams_omitted,
        },
        "quota": {
            "day": day,
            "timezone": cloud.day_timezone,
            "limit_per_device": cloud.daily_points_limit,
            "resets_at": iso(quota.next_reset_ms(now_ms)),
            "devices": quota_rows,
            "devices_omitted": quota_omitted,
        },
        "forecast": {
            "max_age_days": cloud.max_age_days,
            "age_margin_hours": cloud.age_margin_hours,
            "order": settings.flush.order,
            "will_expire": sum(row["will_expire"] for row in forecasts),
            "devices": forecast_rows,
            "devices_omitted": forecasts_omitted,
        },
        "drain": _drain(backlog, rates),
        "dead_letters": {
            "total": sum(view.dead_letters.values()),
            "by_reason": clip_keys(view.dead_letters.items()),
        },
        "evictions": {
            "evicted": sum(evicted for evicted, _ in drops.values()),
            "refused": sum(refused for _, refused in drops.values()),
            "by_device": dict(drop_rows),
            "by_device_omitted": drops_omitted,
        },
        "ingest": _ingest(live),
        "sampling": sampling_report(settings, rates, live.get("sampling", {}) if live else {}),
        "database": {
            "path": str(path),
            "file_bytes": view.file_bytes,
        },
    }


def largest(
    rows: list[T], weight: Callable[[T], Any], limit: int = MAX_ROWS
) -> tuple[list[T], int]:
    """The `limit` heaviest rows, in their order, and how many were left out."""
    if len(rows) <= limit:
        return rows, 0
    kept = sorted(sorted(range(len(rows)), key=lambda i: weight(rows[i]), reverse=True)[:limit])
    return [rows[i] for i in kept], len(rows) - limit


def _stream_row(head: StreamHead, readings: int, now_ms: int) -> dict[str, Any]:
    parked = head.parked_reason
    return {
        "device_id": head.key.device_id,
        "datastream_id": head.key.datastream_id,
        "readings": readings,
        "oldest": iso(head.oldest_ts_ms),
        "oldest_age_s": _age_s(head.oldest_ts_ms, now_ms),
        "parked": None if parked is None else clip(parked),  # the cloud's words
    }


def _daemon(live: dict[str, Any] | None, now_ms: int) -> dict[str, Any]:
    if live is None:
        return {"running": False}
    return {
        "running": True,
        "pid": live["pid"],
        "version": live["version"],
        "started_at": iso(live["started_at_ms"]),
        "uptime_s": _age_s(live["started_at_ms"], now_ms),
        "buffered_in_memory": live["buffered_points"],
        "disk_full": live["disk_full"],
        "holding_acks": live["holding_acks"],
    }


def _cloud(live: dict[str, Any] | None, settings: Settings, now_ms: int) -> dict[str, Any]:
    info: dict[str, Any] = {"server": settings.cloud.server}
    if live is None:
        return info | {"online": None}
    return info | {
        "online": live["cloud_online"],
        "since": iso(live["cloud_since_ms"]),
        "last_upload_ok": iso(live["last_upload_ok_ms"]),
        "last_upload_ok_age_s": _age_s(live["last_upload_ok_ms"], now_ms),
        "last_error": None if live["last_error"] is None else clip(live["last_error"], ERROR_CHARS),
        "last_error_kind": live["last_error_kind"],
        "last_error_at": iso(live["last_error_ms"]),
        "uploads": live["uploads"],
        "requests_last_minute": live.get("cloud_requests_last_minute"),
        "requests_per_minute_limit": live.get("cloud_requests_per_minute_limit"),
        "pass_through": live.get("pass_through"),
    }


def _clock(
    live: dict[str, Any] | None, settings: Settings, view: BufferView | None = None
) -> dict[str, Any]:
    """Whether the daemon trusts the clock (unknown when it is not running), and what the
    buffer holds for it: readings without a wall time yet, the last correction."""
    from gateway.clock import sync_source
    from gateway.store.timekeeping import correction_json

    clock = {"source": sync_source(settings.clock).name, "synchronized": None, "problem": None}
    if live and live.get("clock"):
        clock = live["clock"]
    if view is None:
        return clock
    last = view.last_correction
    return clock | {
        "provisional": view.provisional,
        "last_correction": None if last is None else correction_json(last),
    }


def _drain(backlog: int, rates: dict[str, float]) -> dict[str, Any]:
    out_rate = rates.get("delivered")
    in_rate = rates.get("stored")
    return {
        "observed_out_per_s": out_rate,
        "observed_in_per_s": in_rate,
        "eta_s": _round(drain_eta_s(backlog, out_rate or 0.0, in_rate or 0.0)) if rates else None,
    }


def _ingest(live: dict[str, Any] | None) -> dict[str, Any] | None:
    if live is None:
        return None
    # Clipped here too: the daemon clips them, but may be an older one.
    unmapped = list(live["unmapped_devices"].items())[:NAMES_SHOWN]
    return {
        "readings": live["readings"],
        "rejected_by_reason": clip_keys(live["rejected_by_reason"].items()),
        "unmapped_devices": clip_keys(unmapped),
        "unmapped_devices_total": live["unmapped_devices_total"],
    }


def iso(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))


def _age_s(epoch_ms: int | None, now_ms: int) -> float | None:
    return None if epoch_ms is None else round(max(0, now_ms - epoch_ms) / 1000, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --------------------------------------------------------------------------- sampling


def sampling_report(
    settings: Settings, rates: dict[str, float], observed: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Per device: points per day arriving and leaving (observed over the last minutes),
    the quota, whether it fits, and the `sample` rule in force per datastream: as the
    daemon saw its readings meet it (`observed`, "device/datastream" -> rule), else as the
    configuration says (the first route that can send the device that datastream)."""
    from gateway.ingest.routes import RouteTable
    from gateway.ops.observe import describe_rule, device_rates

    table = RouteTable(
        settings.routes,
        settings.mqtt.max_payload_bytes,
        devices=settings.devices,
        daily_points_limit=settings.cloud.daily_points_limit,
    )
    plan = table.sampling
    arriving = device_rates(rates, "arriving_device_")
    sending = device_rates(rates, "sending_device_")
    limit = settings.cloud.daily_points_limit
    devices = []
    seen: dict[int, dict[int, dict[str, Any]]] = {}
    for name, rule in observed.items():
        device, _, datastream = name.partition("/")
        seen.setdefault(int(device), {})[int(datastream)] = rule | {"source": "observed"}
    for device_id in sorted(set(plan.devices()) | set(arriving) | set(seen)):
        streams = plan.device(device_id)
        rules = {
            datastream_id: describe_rule(rule, datastream_id in streams.fitted)
            | {"source": "configured"}
            for datastream_id, rule in streams.rules.items()
        } | seen.get(device_id, {})
        per_day = _per_day(sending.get(device_id))
        planned = _planned_per_day(list(rules.values()))
        sent = per_day if per_day is not None else planned
        devices.append(
            {
                "device_id": device_id,
                "arriving_per_day": _per_day(arriving.get(device_id)),
                "points_per_day": per_day,
                "planned_points_per_day": planned,
                "quota": limit,
                "fits": None if sent is None else sent <= limit,
                "sampled": any(rule["rule"] != "raw" for rule in rules.values()),
                "streams": [
                    {"datastream_id": datastream_id} | rule
                    for datastream_id, rule in sorted(rules.items())
                ],
            }
        )
    return {"limit_per_device": limit, "devices": devices}


def _per_day(rate_per_s: float | None) -> float | None:
    return None if rate_per_s is None else round(rate_per_s * 86_400, 1)


def _planned_per_day(rules: list[dict[str, Any]]) -> int | None:
    """Points a day if every datastream is windowed (at most one per window); else None."""
    windows = [float(rule["window_s"]) for rule in rules if "window_s" in rule]
    if not windows or len(windows) != len(rules):
        return None
    return sum(round(86_400 / window_s) for window_s in windows)
