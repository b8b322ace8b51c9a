"""`blynk-gateway status` as a table for people: the report `status.py` collects, rendered
for an operator reading it over SSH. Kept apart from the collecting, which `--json` shares,
so each reads on its own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.cli.status import MAX_ROWS, TABLE_ROWS, iso, largest


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


def _cut(
    rows: list[dict[str, Any]], omitted: int, weight: Callable[[dict[str, Any]], Any], what: str
) -> tuple[list[dict[str, Any]], list[str]]:
    """The TABLE_ROWS heaviest rows, and the line that says how many are not shown."""
    shown, hidden = largest(rows, weight, TABLE_ROWS)
    hidden += omitted
    if not hidden:
        return shown, []
    return shown, [f"    ... and {hidden:,} more {what} (--json lists up to {MAX_ROWS:,})"]


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

    lines += _clock_lines(report["clock"])
    backlog = report["backlog"]
    lines.append(
        f"backlog     {_n(backlog['readings'])} readings"
        + (f", oldest {_dur(backlog['oldest_age_s'])} old" if backlog["streams"] else "")
    )
    if backlog["streams"]:
        streams, more = _cut(
            backlog["streams"], backlog["streams_omitted"], lambda s: s["readings"], "streams"
        )
        rows = [["device", "datastream", "readings", "oldest", "state"]]
        rows += [
            [
                str(s["device_id"]),
                str(s["datastream_id"]),
                _n(s["readings"]),
                _dur(s["oldest_age_s"]),
                f"parked: {s['parked']}" if s["parked"] else "",
            ]
            for s in streams
        ]
        lines += _table(rows) + more

    quota = report["quota"]
    lines.append(
        f"quota       {quota['day']} ({quota['timezone']}), {_n(quota['limit_per_device'])} "
        f"per device, resets {quota['resets_at']}"
    )
    if quota["devices"]:
        devices, more = _cut(
            quota["devices"], quota["devices_omitted"], lambda d: d["used"], "devices"
        )
        rows = [["device", "used today", "left", ""]]
        rows += [
            [
                str(d["device_id"]),
                _n(d["used"]),
                _n(d["left"]),
                "refused by cloud" if d["refused_by_cloud"] else "",
            ]
            for d in devices
        ]
        lines += _table(rows) + more

    forecast, drain = report["forecast"], report["drain"]
    lines.append(
        f"forecast    {_n(forecast['will_expire'])} readings WILL EXPIRE before they can be sent "
        f"(quota and {forecast['max_age_days']:g}-day age limit less "
        f"{forecast['age_margin_hours']:g} h, {forecast['order']} first)"
    )
    if forecast["devices"]:
        devices, more = _cut(
            forecast["devices"],
            forecast["devices_omitted"],
            lambda f: (f["will_expire"], f["backlog"]),
            "devices",
        )
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
            for f in devices
        ]
        lines += _table(rows) + more
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
    lines += render_sampling(report["sampling"])
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


def render_sampling(sampling: dict[str, Any]) -> list[str]:
    """One row per device, then its datastreams' rules: those its readings met, when the
    daemon saw some, else those the configuration gives it."""
    devices = sampling["devices"]
    if not devices:
        return []
    lines = [f"sampling    quota {_n(sampling['limit_per_device'])} points per device per day"]
    rows = [["device", "arriving/day", "sent/day", "fits"]]
    details: list[list[str]] = [[]]
    for device in devices:
        sent = device["points_per_day"]
        if sent is None and device["planned_points_per_day"] is not None:
            sent_text = f"<= {_n(device['planned_points_per_day'])}"
        else:
            sent_text = _n(None if sent is None else round(sent))
        arriving = device["arriving_per_day"]
        fits = {True: "yes", False: "NO", None: "-"}[device["fits"]]
        if device["fits"] is False and not device["sampled"]:
            fits += ": no sample rule (see `routes suggest`)"
        rows.append(
            [
                str(device["device_id"]),
                _n(None if arriving is None else round(arriving)),
                sent_text,
                fits,
            ]
        )
        streams = device["streams"]
        if any(stream["source"] == "observed" for stream in streams):
            streams = [stream for stream in streams if stream["source"] == "observed"]
        details.append([f"        datastream {s['datastream_id']}: {s['rule']}" for s in streams])
    for line, extra in zip(_table(rows), details, strict=True):
        lines += [line, *extra]
    return lines


def _clock_lines(clock: dict[str, Any]) -> list[str]:
    """`clock  synchronized (kernel)`, or why uploads wait and what is held for it."""
    source, held = clock["source"], clock.get("provisional") or 0
    if clock["synchronized"] is None:
        state = f"unknown ({source})"
    elif clock["synchronized"]:
        state = f"synchronized ({source})"
    else:
        state = f"NOT SYNCHRONIZED ({source}): uploads wait for it"
        if clock.get("problem"):
            state += f"; {clock['problem']}"
    lines = [f"clock       {state}" + (f", {_n(held)} readings held for it" if held else "")]
    if clock["synchronized"] is False:
        lines.append('            [clock] trust = "always" if this box keeps time without NTP')
    last = clock.get("last_correction")
    if last:
        what = f"{_n(last['corrected'])} readings given their time"
        if last["dead_lettered"]:
            what += f", {_n(last['dead_lettered'])} dead-lettered (clock_unknown)"
        offset_s = last["offset_s"]  # wall - boottime: when that boot began
        if offset_s is None:
            began = "no time known"
        else:
            began = ("ESTIMATED to have begun " if last["estimated"] else "began ") + str(
                iso(round(offset_s * 1000))
            )
        lines.append(
            f"            last correction {iso(last['at_ms'])}: {what} "
            f"(boot {last['boot_id'][:8]} {began})"
        )
    return lines
