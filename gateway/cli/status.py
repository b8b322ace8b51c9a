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
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from gateway.errors import ConfigError, GatewayError, StoreCorrupt, StoreError
from gateway.ops.forecast import drain_eta_s, forecast_device

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.models import StreamKey
    from gateway.store import StreamHead

# Backlog histogram resolution for the forecast: an hour of timestamps per bucket.
BUCKET_MS = 3_600_000


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
        "generated_at": _iso(now_ms),
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


# Every key of the report, in order; those after `error` are null when unknown.
REPORT_SECTIONS = (
    "daemon",
    "cloud",
    "mqtt",
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
        "generated_at": _iso(now_ms),
        "error": None,
        "daemon": _daemon(live, now_ms),
        "cloud": _cloud(live, settings, now_ms),
        "mqtt": {
            "broker": f"{settings.mqtt.host}:{settings.mqtt.port}",
            "connected": live["mqtt_connected"] if live else None,
        },
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

    per_stream: dict[Any, int] = defaultdict(int)
    per_device_hist: dict[int, dict[Any, list[tuple[int, int]]]] = defaultdict(dict)
    for key, bucket, count in view.histogram:
        per_stream[key] += count
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
                "clears_at": _iso(result.clears_at_ms),
                "quota_days": result.days,
                "observed_rate_per_s": rate,
                "eta_at_observed_rate_s": _round(drain_eta_s(result.backlog, rate or 0.0)),
            }
        )
    backlog = sum(per_stream.values())
    oldest = min((head.oldest_ts_ms for head in heads), default=None)
    return header | {
        "backlog": {
            "readings": backlog,
            "oldest": _iso(oldest),
            "oldest_age_s": _age_s(oldest, now_ms),
            "streams": [
                {
                    "device_id": head.key.device_id,
                    "datastream_id": head.key.datastream_id,
                    "readings": per_stream.get(head.key, 0),
                    "oldest": _iso(head.oldest_ts_ms),
                    "oldest_age_s": _age_s(head.oldest_ts_ms, now_ms),
                    "parked": head.parked_reason,
                }
                for head in heads
            ],
        },
        "quota": {
            "day": day,
            "timezone": cloud.day_timezone,
            "limit_per_device": cloud.daily_points_limit,
            "resets_at": _iso(quota.next_reset_ms(now_ms)),
            "devices": [
                {
                    "device_id": device,
                    "used": used,
                    "left": quota.allowance(used, exhausted),
                    "refused_by_cloud": exhausted,
                }
                for device, (used, exhausted) in sorted(ledger.items())
            ],
        },
        "forecast": {
            "max_age_days": cloud.max_age_days,
            "age_margin_hours": cloud.age_margin_hours,
            "order": settings.flush.order,
            "will_expire": sum(item["will_expire"] for item in forecasts),
            "devices": forecasts,
        },
        "drain": _drain(backlog, rates),
        "dead_letters": {"total": sum(view.dead_letters.values()), "by_reason": view.dead_letters},
        "evictions": {
            "evicted": sum(evicted for evicted, _ in drops.values()),
            "refused": sum(refused for _, refused in drops.values()),
            "by_device": {str(d): {"evicted": e, "refused": r} for d, (e, r) in drops.items()},
        },
        "ingest": _ingest(live),
        "database": {
            "path": str(path),
            "file_bytes": view.file_bytes,
        },
    }


def _daemon(live: dict[str, Any] | None, now_ms: int) -> dict[str, Any]:
    if live is None:
        return {"running": False}
    return {
        "running": True,
        "pid": live["pid"],
        "version": live["version"],
        "started_at": _iso(live["started_at_ms"]),
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
        "since": _iso(live["cloud_since_ms"]),
        "last_upload_ok": _iso(live["last_upload_ok_ms"]),
        "last_upload_ok_age_s": _age_s(live["last_upload_ok_ms"], now_ms),
        "last_error": live["last_error"],
        "last_error_kind": live["last_error_kind"],
        "last_error_at": _iso(live["last_error_ms"]),
        "uploads": live["uploads"],
        "requests_last_minute": live.get("cloud_requests_last_minute"),
        "requests_per_minute_limit": live.get("cloud_requests_per_minute_limit"),
        "pass_through": live.get("pass_through"),
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
    return {
        "readings": live["readings"],
        "rejected_by_reason": live["rejected_by_reason"],
        "unmapped_devices": live["unmapped_devices"],
        "unmapped_devices_total": live["unmapped_devices_total"],
    }


def _iso(epoch_ms: int | None) -> str | None:
    if epoch_ms is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))


def _age_s(epoch_ms: int | None, now_ms: int) -> float | None:
    return None if epoch_ms is None else round(max(0, now_ms - epoch_ms) / 1000, 1)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# --------------------------------------------------------------------------- the table


def _n(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _dur(seconds: float | None) -> str:
    from gateway.log import format_duration

    return "-" if seconds is None else format_duration(seconds)


def _table(rows: list[list[str]], indent: str = "    ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        (indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def render(report: dict[str, Any]) -> str:
    """The report as an operator reads it over SSH."""
    lines = [f"blynk-gateway status at {report['generated_at']}"]
    daemon, cloud, mqtt = report["daemon"], report["cloud"], report["mqtt"]
    if daemon["running"]:
        lines.append(
            f"daemon      running, pid {daemon['pid']}, version {daemon['version']}, "
            f"up {_dur(daemon['uptime_s'])}"
            + (", DISK FULL" if daemon["disk_full"] else "")
            + (", holding MQTT acks" if daemon["holding_acks"] else "")
        )
        state = "online" if cloud["online"] else "OFFLINE"
        last_ok = cloud["last_upload_ok"]
        lines.append(
            f"cloud       {state} since {cloud['since']}, {cloud['server']}; last upload "
            + (f"{last_ok} ({_dur(cloud['last_upload_ok_age_s'])} ago)" if last_ok else "none")
        )
        if cloud["last_error"]:
            lines.append(f"            last error {cloud['last_error_at']}: {cloud['last_error']}")
        if cloud.get("requests_per_minute_limit"):
            lines.append(
                f"            requests {_n(cloud['requests_last_minute'])} in the last minute "
                f"(limit {_n(cloud['requests_per_minute_limit'])}/min); "
                f"pass-through {cloud['pass_through']}"
            )
        lines.append(
            f"mqtt        {'connected' if mqtt['connected'] else 'DISCONNECTED'} ({mqtt['broker']})"
        )
    else:
        lines.append("daemon      NOT RUNNING: figures below come from the database alone")
        lines.append(f"cloud       unknown ({cloud['server']})")
        lines.append(f"mqtt        unknown ({mqtt['broker']})")

    backlog = report["backlog"]
    lines.append(
        f"backlog     {_n(backlog['readings'])} readings"
        + (f", oldest {_dur(backlog['oldest_age_s'])} old" if backlog["streams"] else "")
    )
    if backlog["streams"]:
        rows = [["device", "datastream", "readings", "oldest", "state"]]
        rows += [
            [
                str(s["device_id"]),
                str(s["datastream_id"]),
                _n(s["readings"]),
                _dur(s["oldest_age_s"]),
                f"parked: {s['parked']}" if s["parked"] else "",
            ]
            for s in backlog["streams"]
        ]
        lines += _table(rows)

    quota = report["quota"]
    lines.append(
        f"quota       {quota['day']} ({quota['timezone']}), {_n(quota['limit_per_device'])} "
        f"per device, resets {quota['resets_at']}"
    )
    if quota["devices"]:
        rows = [["device", "used today", "left", ""]]
        rows += [
            [
                str(d["device_id"]),
                _n(d["used"]),
                _n(d["left"]),
                "refused by cloud" if d["refused_by_cloud"] else "",
            ]
            for d in quota["devices"]
        ]
        lines += _table(rows)

    forecast, drain = report["forecast"], report["drain"]
    lines.append(
        f"forecast    {_n(forecast['will_expire'])} readings WILL EXPIRE before they can be sent "
        f"(quota and {forecast['max_age_days']:g}-day age limit less "
        f"{forecast['age_margin_hours']:g} h, {forecast['order']} first)"
    )
    if forecast["devices"]:
        rows = [["device", "backlog", "will send", "will expire", "cleared by", "at observed"]]
        rows += [
            [
                str(f["device_id"]),
                _n(f["backlog"]),
                _n(f["will_send"]),
                _n(f["will_expire"]),
                f"{f['clears_at']} ({f['quota_days']} quota days)",
                _dur(f["eta_at_observed_rate_s"])
                if f["observed_rate_per_s"]
                else ("quota spent" if f["observed_rate_per_s"] == 0 else "-"),
            ]
            for f in forecast["devices"]
        ]
        lines += _table(rows)
    if drain["observed_out_per_s"] is not None:
        lines.append(
            f"drain       {drain['observed_out_per_s']:.1f}/s sent, "
            f"{drain['observed_in_per_s'] or 0:.1f}/s stored over the last minutes: "
            + (
                f"empty in {_dur(drain['eta_s'])}"
                if drain["eta_s"] is not None
                else "not shrinking"
            )
        )

    dead = report["dead_letters"]
    reasons = ", ".join(f"{reason} {_n(count)}" for reason, count in dead["by_reason"].items())
    lines.append(f"dead letters {_n(dead['total'])}" + (f": {reasons}" if reasons else ""))
    evictions = report["evictions"]
    lines.append(
        f"evictions   {_n(evictions['evicted'])} evicted (drop-oldest), "
        f"{_n(evictions['refused'])} refused (drop-newest), since the buffer was created"
    )
    ingest = report["ingest"]
    if ingest is not None:
        unmapped = ingest["unmapped_devices"]
        names = ", ".join(f"{name} ({_n(count)})" for name, count in unmapped.items())
        lines.append(
            "unmapped    "
            + (f"{ingest['unmapped_devices_total']} device names: {names}" if names else "none")
        )
    database = report["database"]
    lines.append(
        f"database    {database['path']}, {database['file_bytes'] / 1e6:.1f} MB with its WAL"
    )
    return "\n".join(lines)
