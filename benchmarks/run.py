"""The whole benchmark suite in one command: one table, one JSON file (issue #11).

Every figure is the median (and min-max) of `--repeats` runs and comes with a baseline
measured in the same run, on the same private Mosquitto (`MosquittoBroker`) and the same
sandbox cloud (`SandboxThread`), so that the ratio means something on a small, shared,
noisy machine where absolute numbers do not. Nothing leaves 127.0.0.1. The sections reuse
the single-purpose scripts next to this one (each still runs alone, with more options):

==========  ==============================================  ==============================
section     figure                                          baseline (same run)
==========  ==============================================  ==============================
throughput  whole daemon, N queued QoS 1 readings -> cloud  bare paho, manual ack, counting
            accepted: readings/s and CPU µs per reading     (`ingest_throughput.py`)
            ingest alone (PUBACK after commit)              bare paho, auto-ack
wear        bytes written per reading at 20/s and 1/s,      commit per message
            cloud reachable (`sd_wear.py`)
memory      RSS after a live burst of N readings and after  floor: python + the runtime
            a broker replay of N queued ones, cloud down:   deps imported
            peak and steady (`memory_burst.py`)
startup     RSS idle / with R rows opened from disk;        floor; empty buffer
            exec -> ready, exec -> first batch accepted,
            open -> first lease (`startup_backlog.py`)
drain       upload points/s from a buffered backlog         raw httpx posting the same
            (`drain_cloud.py`)                              batches to the same sandbox
outage      cloud back -> first batch accepted, after each  none by default (absolute);
            outage length (`outage_resume.py`)              `--outage-baseline REF` runs
                                                            an old commit's daemon
latency     the sandbox answering 0 ms and 100 ms late
            (issue 18; `--latencies`), at each:
            (a) N queued QoS 1 readings over 20 devices     bare paho, manual ack, the
                -> accepted by the cloud: readings/s        same backlog (`ingest_throughput
                                                            .py`, `… x20` variants)
            (b) drain R buffered readings over 20 devices   raw httpx, same batches, 4 at
                (`drain_cloud.py`): points/s                a time, same latency
            (c) 100 readings/s over 20 datastreams: import  pass-through off (write first),
                requests per reading delivered, bytes       same latency
                written per reading (`sd_wear.py`)
==========  ==============================================  ==============================

    .venv/bin/python benchmarks/run.py                   # the full suite, ~35 min on 2 vCPU
    .venv/bin/python benchmarks/run.py --only latency    # issue 18's figures, ~9 min
    .venv/bin/python benchmarks/run.py --quick --json-out /tmp/bench.json   # CI, ~1.5 min
    .venv/bin/python benchmarks/run.py --only memory --burst 200000 --repeats 5

`--quick` only proves the suite still works: its N are too small for the figures to mean
anything, and nothing in it is compared with a threshold. The exit status is 1 when a
section found an integrity problem (a reading lost, duplicated or never acknowledged).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import drain_cloud
import ingest_throughput
import memory_burst
import outage_resume
import sd_wear
import startup_backlog

from gateway import log as gateway_log
from gateway.testing.broker import MosquittoBroker
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_run import SandboxThread

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "wear", "memory", "startup", "drain", "outage", "latency")
DEVICES = {
    **sd_wear.DEVICES,
    **startup_backlog.DEVICES,
    **outage_resume.DEVICES,
    **memory_burst.DEVICES,
}


@dataclass
class Figure:
    """One line of the table: our runs against the baseline's runs of the same repeats."""

    section: str
    name: str
    unit: str
    baseline_name: str
    now: list[float]
    baseline: list[float] = field(default_factory=list)
    target: str = ""
    # How the ratio reads: "ratio" now/baseline; "excess" now - baseline (memory over floor).
    compare: str = "ratio"

    @property
    def now_median(self) -> float:
        return _median(self.now)

    @property
    def baseline_median(self) -> float:
        return _median(self.baseline)

    @property
    def versus(self) -> float:
        if self.compare == "excess":
            return self.now_median - self.baseline_median
        base = self.baseline_median
        return self.now_median / base if base else math.nan

    def as_json(self) -> dict[str, Any]:
        document = asdict(self)
        document.update(
            now_median=self.now_median,
            baseline_median=self.baseline_median,
            versus=self.versus,
        )
        return {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in document.items()
        }


def _median(values: list[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


@dataclass
class Params:
    """Sizes and lengths of one run: the full defaults, or `--quick`'s smoke-test sizes."""

    repeats: int = 3
    messages: int = 50_000  # throughput: queued QoS 1 readings
    wear_warmup_s: float = 3.0
    wear_windows: dict[float, float] = field(default_factory=lambda: {20.0: 10.0, 1.0: 15.0})
    burst: int = 500_000  # memory: readings per burst (live and replay), cloud down
    burst_settle_s: float = 5.0
    backlog_rows: int = 1_000_000  # startup: rows opened from disk
    startup_settle_s: float = 5.0
    drain_rows: int = 200_000
    outages_s: list[float] = field(default_factory=lambda: [10.0, 120.0, 360.0])
    outage_repeats: int = 1
    outage_baseline: str | None = None
    latencies_ms: list[float] = field(default_factory=lambda: [0.0, 100.0])
    latency_backlog: int = 20_000  # latency (a): queued QoS 1 readings over 20 devices
    latency_drain_rows: int = 200_000  # latency (b): buffered readings over 20 devices
    steady_rate: float = 100.0  # latency (c): readings/s over 20 datastreams
    steady_warmup_s: float = 5.0  # a start-up takes a few round trips to settle
    steady_window_s: float = 10.0

    @classmethod
    def quick(cls) -> Params:
        return cls(
            repeats=1,
            messages=2_000,
            wear_warmup_s=0.5,
            wear_windows={20.0: 1.5, 1.0: 2.0},
            burst=5_000,
            burst_settle_s=0.5,
            backlog_rows=20_000,
            startup_settle_s=0.5,
            drain_rows=10_000,
            outages_s=[3.0],
            # At 100 ms today's gateway drains a broker backlog at ~200-400 readings/s.
            latency_backlog=1_000,
            latency_drain_rows=10_000,
            steady_warmup_s=1.0,
            steady_window_s=3.0,
        )


@dataclass
class Context:
    params: Params
    workdir: Path
    broker: MosquittoBroker
    sandbox: SandboxThread
    figures: list[Figure] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)


# --------------------------------------------------------------------------- sections


def throughput_rounds(
    ctx: Context, variants: list[ingest_throughput.Variant], n: int, prefix: str
) -> dict[str, list[ingest_throughput.Trial]]:
    """`ctx.params.repeats` rounds of `variants` on a private broker, integrity checked."""
    runs: dict[str, list[ingest_throughput.Trial]] = {v.name: [] for v in variants}
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=ctx.workdir))
    with ingest_throughput.private_broker(workdir, n) as broker:
        for round_no in range(ctx.params.repeats):
            for name, trial in ingest_throughput.run_round(
                broker, variants, n, round_no, workdir
            ).items():
                runs[name].append(trial)
    ctx.problems += ingest_throughput.check_integrity(variants, runs, n)
    return runs


def section_throughput(ctx: Context) -> None:
    """`ingest_throughput` rounds with the four variants the table needs, own broker
    (Mosquitto's default in-flight window, no persistence, as that script sets it up)."""
    n = ctx.params.messages
    names = ("bare-paho json", "bare-paho-manual json", "ingest-311 json", "gateway-311 json")
    variants = [v for v in ingest_throughput.VARIANTS if v.name in names]
    runs = throughput_rounds(ctx, variants, n, "throughput-")

    def rate(name: str) -> list[float]:
        return [n / t.elapsed_s for t in runs[name]]

    def cpu_us(name: str) -> list[float]:
        return [t.watch.cpu_s / n * 1e6 for t in runs[name]]

    ctx.add(
        Figure(
            "throughput",
            f"whole daemon: {n:,} queued QoS 1 readings -> accepted by the cloud",
            "readings/s",
            "bare paho, manual ack, counting only",
            rate("gateway-311 json"),
            rate("bare-paho-manual json"),
            ">= 0.8x",
        )
    )
    ctx.add(
        Figure(
            "throughput",
            "whole daemon: CPU per reading (sandbox in its own process)",
            "µs",
            "bare paho, manual ack, counting only",
            cpu_us("gateway-311 json"),
            cpu_us("bare-paho-manual json"),
            "<= 40 µs",
        )
    )
    ctx.add(
        Figure(
            "throughput",
            "ingest alone: MQTT -> committed, PUBACK after commit",
            "readings/s",
            "bare paho, auto-ack",
            rate("ingest-311 json"),
            rate("bare-paho json"),
            ">= 0.9x",
        )
    )


def section_wear(ctx: Context) -> None:
    """`sd_wear.measure` for commit-per-message and the default, cloud reachable."""
    variants = {v.name: v for v in sd_wear.VARIANTS}
    targets = {20.0: "<= 200 B", 1.0: "<= 500 B"}
    for rate, window in ctx.params.wear_windows.items():
        args = SimpleNamespace(rate=rate, warmup=ctx.params.wear_warmup_s, window=window)
        # "write-first" (pass-through off) exists once pass-through does: both are shown.
        names = [n for n in ("commit-per-message", "default", "write-first") if n in variants]
        results: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(ctx.params.repeats):
            for name in results:
                results[name].append(
                    sd_wear.measure(variants[name], ctx.workdir, ctx.broker, ctx.sandbox, args)
                )
        for name in names[1:]:
            ctx.add(
                Figure(
                    "wear",
                    f"bytes written per reading, cloud reachable, {rate:g} readings/s"
                    + ("" if name == "default" else f" ({name})"),
                    "B",
                    "commit per message",
                    results[name],
                    results["commit-per-message"],
                    targets.get(rate, "") if name == "default" else "",
                )
            )


def section_memory(ctx: Context) -> None:
    """`memory_burst.burst`, live and replay, with the floor measured in each repeat."""
    floors: list[float] = []
    results: dict[str, list[memory_burst.BurstResult]] = {"live": [], "replay": []}
    for _ in range(ctx.params.repeats):
        floors.append(memory_burst.floor_rss_mib())
        for mode, runs in results.items():
            runs.append(
                memory_burst.burst(
                    ctx.workdir,
                    ctx.broker,
                    ctx.sandbox,
                    ctx.params.burst,
                    ctx.params.burst_settle_s,
                    mode=mode,
                )
            )
    floor_name = "floor: python + runtime deps imported"
    burst = f"{ctx.params.burst:,}"
    what = {
        "live": f"live burst of {burst} readings, cloud down",
        "replay": f"broker replaying {burst} queued readings, cloud down",
    }
    for mode, runs in results.items():
        ctx.add(
            Figure(
                "memory",
                f"RSS peak, {what[mode]}",
                "MiB",
                floor_name,
                [r.peak_mib for r in runs],
                floors,
                "<= floor + 15",
                "excess",
            )
        )
        ctx.add(
            Figure(
                "memory",
                f"RSS steady, {ctx.params.burst_settle_s:g} s after the {mode} burst",
                "MiB",
                floor_name,
                [r.steady_mib for r in runs],
                floors,
                "<= floor + 5",
                "excess",
            )
        )
        rates = ", ".join(f"{r.rate:,.0f}" for r in runs)
        ctx.notes.append(f"memory, {mode}: readings/s stored per repeat: {rates}")
    ctx.notes.append(f"memory floor (MiB) per repeat: {', '.join(f'{f:.1f}' for f in floors)}")


def section_startup(ctx: Context) -> None:
    """`startup_backlog`: the daemon on an empty and on a big buffer, plus the in-process
    open -> first lease."""
    rows = ctx.params.backlog_rows
    base_ts = int(time.time() * 1000) - 3_600_000
    big, empty = ctx.workdir / "startup-big.db", ctx.workdir / "startup-empty.db"
    startup_backlog.build(big, rows, base_ts)
    startup_backlog.build(empty, 0, base_ts)
    daemon: dict[str, dict[str, list[float]]] = {"empty": {}, "backlog": {}}
    lease_ms: dict[str, list[float]] = {"empty": [], "backlog": []}
    floors = []
    for _ in range(ctx.params.repeats):
        floors.append(memory_burst.floor_rss_mib())
        for label, path in (("empty", empty), ("backlog", big)):
            lease_ms[label].append(asyncio.run(startup_backlog.open_to_lease(path))[1])
            copy = ctx.workdir / f"startup-run-{label}.db"
            shutil.copyfile(path, copy)
            figures = startup_backlog.daemon_run(
                copy, ctx.broker, ctx.sandbox, ctx.workdir, ctx.params.startup_settle_s
            )
            for key, value in figures.items():
                daemon[label].setdefault(key, []).append(value)
            for suffix in ("", "-wal", "-shm", ".reserve"):
                Path(f"{copy}{suffix}").unlink(missing_ok=True)
    floor_name = "floor: python + runtime deps imported"
    ctx.add(
        Figure(
            "startup",
            "RSS idle (empty buffer, uploading nothing)",
            "MiB",
            floor_name,
            daemon["empty"]["rss_mib"],
            floors,
            "<= floor + 5",
            "excess",
        )
    )
    ctx.add(
        Figure(
            "startup",
            f"RSS with {rows:,} rows opened from disk (uploading)",
            "MiB",
            floor_name,
            daemon["backlog"]["rss_mib"],
            floors,
            "<= floor + 5",
            "excess",
        )
    )
    ctx.add(
        Figure(
            "startup",
            f"exec -> ready, {rows:,} buffered readings",
            "ms",
            "empty buffer",
            daemon["backlog"]["ready_ms"],
            daemon["empty"]["ready_ms"],
        )
    )
    ctx.add(
        Figure(
            "startup",
            f"exec -> first batch accepted, {rows:,} buffered readings",
            "ms",
            "exec -> ready, empty buffer",
            daemon["backlog"]["first_upload_ms"],
            daemon["empty"]["ready_ms"],
        )
    )
    ctx.add(
        Figure(
            "startup",
            f"Store.open -> first lease (clean stop), {rows:,} rows",
            "ms",
            "empty buffer",
            lease_ms["backlog"],
            lease_ms["empty"],
        )
    )
    for path in (big, empty):
        for suffix in ("", "-wal", "-shm", ".reserve"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def section_drain(ctx: Context) -> None:
    """`drain_cloud.measure`: the daemon's upload rate against raw httpx."""
    rows = ctx.params.drain_rows
    base_ts = int(time.time() * 1000) - 3_600_000
    source = ctx.workdir / "drain-source.db"
    startup_backlog.build(source, rows, base_ts)
    daemon, raw = [], []
    for _ in range(ctx.params.repeats):
        ours, theirs = drain_cloud.measure(
            source, rows, base_ts, ctx.broker, ctx.sandbox, ctx.workdir
        )
        daemon.append(ours)
        raw.append(theirs)
    ctx.add(
        Figure(
            "drain",
            f"drain {rows:,} buffered readings to the cloud",
            "points/s",
            f"raw httpx, same batches, {drain_cloud.CONCURRENCY} at a time, same sandbox",
            daemon,
            raw,
        )
    )
    source.unlink(missing_ok=True)


def section_outage(ctx: Context) -> None:
    """`outage_resume.one_outage` per outage length; an old commit's daemon as the
    baseline only with `--outage-baseline` (it doubles the section's time)."""
    params = ctx.params
    variants = [outage_resume.Variant("now")]
    tree = ctx.workdir / "outage-baseline"
    if params.outage_baseline:
        variants.insert(0, outage_resume.baseline_variant(params.outage_baseline, tree))
    try:
        for outage_s in params.outages_s:
            results: dict[str, list[float]] = {v.name: [] for v in variants}
            for repeat in range(params.outage_repeats):
                for variant in variants:
                    run_dir = (
                        ctx.workdir / f"outage-{outage_s:g}-{repeat}-{variant.name.split()[0]}"
                    )
                    run_dir.mkdir()
                    results[variant.name].append(
                        outage_resume.one_outage(
                            run_dir, ctx.broker, ctx.sandbox, outage_s, variant
                        )
                    )
                    shutil.rmtree(run_dir, ignore_errors=True)
            baseline = results[variants[0].name] if len(variants) > 1 else []
            ctx.add(
                Figure(
                    "outage",
                    f"cloud back -> first batch accepted, after a {outage_s:g} s outage",
                    "s",
                    variants[0].name if baseline else "none (absolute)",
                    results["now"],
                    baseline,
                    "~ probe interval (5 s)",
                )
            )
    finally:
        if params.outage_baseline:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False
            )


@contextlib.contextmanager
def sandbox_latency(sandbox: SandboxThread, latency_ms: float) -> Iterator[None]:
    """The shared sandbox answering `latency_ms` late for the block, then at once again."""
    sandbox.call(lambda cloud: cloud.set_latency(latency_ms))
    try:
        yield
    finally:
        sandbox.call(lambda cloud: cloud.set_latency(0.0))


def section_latency(ctx: Context) -> None:
    """Issue 18: the cloud a round trip away. Each figure at each latency, against a
    baseline measured in the same run at the same latency."""
    latency_backlog(ctx)
    latency_drain(ctx)
    latency_steady(ctx)


def latency_backlog(ctx: Context) -> None:
    """(a) `ingest_throughput`'s 20-device backlog: one bare client and one daemon per
    latency drain their own copy of each round's backlog (one publish fills them all)."""
    n = ctx.params.latency_backlog
    by_name = {v.name: v for v in ingest_throughput.VARIANTS}
    bare = by_name["bare-paho-manual json x20"]
    daemon = by_name["gateway-311 json x20"]
    daemons = {
        ms: replace(daemon, name=f"{daemon.name} {ms:g}ms", cloud_latency_ms=ms)
        for ms in ctx.params.latencies_ms
    }
    variants = [bare, *daemons.values()]
    runs = throughput_rounds(ctx, variants, n, "latency-backlog-")
    for ms, variant in daemons.items():
        ctx.add(
            Figure(
                "latency",
                f"(a) broker backlog: {n:,} queued QoS 1 readings, {daemon.devices} devices "
                f"-> accepted by the cloud, {ms:g} ms away",
                "readings/s",
                "bare paho, manual ack, same backlog",
                [n / t.elapsed_s for t in runs[variant.name]],
                [n / t.elapsed_s for t in runs[bare.name]],
                ">= 0.8x" if ms == 0 else ">= 0.5x",
            )
        )


def latency_drain(ctx: Context) -> None:
    """(b) `drain_cloud.measure` at each latency, the latencies interleaved per repeat."""
    rows = ctx.params.latency_drain_rows
    base_ts = int(time.time() * 1000) - 3_600_000
    source = ctx.workdir / "latency-drain-source.db"
    startup_backlog.build(source, rows, base_ts)
    daemon: dict[float, list[float]] = {ms: [] for ms in ctx.params.latencies_ms}
    raw: dict[float, list[float]] = {ms: [] for ms in ctx.params.latencies_ms}
    try:
        for _ in range(ctx.params.repeats):
            for ms in ctx.params.latencies_ms:
                ours, theirs = drain_cloud.measure(
                    source, rows, base_ts, ctx.broker, ctx.sandbox, ctx.workdir, ms
                )
                daemon[ms].append(ours)
                raw[ms].append(theirs)
    finally:
        source.unlink(missing_ok=True)
    for ms in ctx.params.latencies_ms:
        ctx.add(
            Figure(
                "latency",
                f"(b) buffered drain: {rows:,} readings, {startup_backlog.STREAMS} devices "
                f"-> the cloud, {ms:g} ms away",
                "points/s",
                f"raw httpx, same batches, {drain_cloud.CONCURRENCY} at a time",
                daemon[ms],
                raw[ms],
                ">= 20,000" if ms >= 100 else "",
            )
        )


def latency_steady(ctx: Context) -> None:
    """(c) `sd_wear.measure_steady`: the daemon's defaults against pass-through off, both
    at the same latency, 20 datastreams."""
    params = ctx.params
    sensors = sd_wear.MAX_SENSORS
    by_name = {v.name: v for v in sd_wear.VARIANTS}
    names = ("write-first", "default", "mqtt5-window-1000")
    results: dict[tuple[float, str], list[sd_wear.Steady]] = {
        (ms, name): [] for ms in params.latencies_ms for name in names
    }
    for _ in range(params.repeats):
        for ms in params.latencies_ms:
            with sandbox_latency(ctx.sandbox, ms):
                for name in names:
                    results[(ms, name)].append(
                        sd_wear.measure_steady(
                            by_name[name],
                            ctx.workdir,
                            ctx.broker,
                            ctx.sandbox,
                            params.steady_rate,
                            params.steady_warmup_s,
                            params.steady_window_s,
                            sensors,
                        )
                    )
    what = f"{params.steady_rate:g} readings/s over {sensors} datastreams"
    variants = (("default", ""), ("mqtt5-window-1000", ", MQTT 5 window 1000, commit 1 s"))
    for ms, (name, how) in itertools.product(params.latencies_ms, variants):
        ours, theirs = results[(ms, name)], results[(ms, "write-first")]
        for unit, pick, target in (
            ("requests", lambda r: r.requests_per_reading, "<= 0.1"),
            ("B", lambda r: r.bytes_per_reading, "<= 200 B"),
        ):
            ctx.add(
                Figure(
                    "latency",
                    f"(c) {'requests' if unit == 'requests' else 'bytes written'} per reading, "
                    f"{what}, cloud {ms:g} ms away{how}",
                    unit,
                    "pass-through off (write first)",
                    [pick(r) for r in ours],
                    [pick(r) for r in theirs],
                    target,
                )
            )
    for ms, name in itertools.product(params.latencies_ms, names):
        counts = ", ".join(f"{r.delivered}/{r.published}" for r in results[(ms, name)])
        ctx.notes.append(
            f"latency (c) {ms:g} ms, {name}: delivered/published in each "
            f"{params.steady_window_s:g} s window: {counts}"
        )


SECTION_FUNCTIONS: dict[str, Callable[[Context], None]] = {
    "throughput": section_throughput,
    "wear": section_wear,
    "memory": section_memory,
    "startup": section_startup,
    "drain": section_drain,
    "outage": section_outage,
    "latency": section_latency,
}


# --------------------------------------------------------------------------- report


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _spread(values: list[float]) -> str:
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return "-"
    if len(clean) == 1:
        return f"{_fmt(clean[0])} (n=1)"
    return f"{_fmt(_median(clean))} ({_fmt(min(clean))}-{_fmt(max(clean))}, n={len(clean)})"


def format_table(figures: list[Figure]) -> str:
    rows = [("figure", "unit", "baseline (same run)", "baseline", "now", "vs base", "target")]
    for f in figures:
        if f.compare == "excess":
            versus = f"floor + {_fmt(f.versus)}" if not math.isnan(f.versus) else "-"
        else:
            versus = f"{f.versus:.2f}x" if not math.isnan(f.versus) else "-"
        rows.append(
            (f.name, f.unit, f.baseline_name, _spread(f.baseline), _spread(f.now), versus, f.target)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        if index == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(line.rstrip() for line in lines)


def machine() -> dict[str, Any]:
    """What the figures were measured on, and which code (others change it between runs)."""
    try:
        mosquitto = subprocess.run(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        mosquitto = "?"
    with open("/proc/loadavg") as handle:
        load = handle.read().split()[:3]
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mosquitto": mosquitto,
        "load_average_at_start": load,
        "gateway_code": ingest_throughput.code_version(),
    }


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def rig(workdir: Path, params: Params) -> Iterator[tuple[MosquittoBroker, SandboxThread]]:
    """One broker and one sandbox for every section but throughput (which needs its own
    persistent sessions): a queue deep enough for the burst, no autosave in the timings,
    a daily quota no run can exhaust."""
    broker = MosquittoBroker(
        workdir / "broker",
        max_queued_messages=max(100_000, params.burst + 10_000),
        persistence=False,
    )
    broker.start()
    sandbox = SandboxThread(SandboxCloud(DEVICES, daily_points_limit=10_000_000))
    try:
        sandbox.start()
        yield broker, sandbox
    finally:
        sandbox.stop()
        broker.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat (CI smoke test)")
    parser.add_argument("--json-out", type=Path, help="write every run's figures here")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="repeatable")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--messages", type=int, help="throughput: queued readings")
    parser.add_argument("--burst", type=int, help="memory: readings in the live burst")
    parser.add_argument("--backlog-rows", type=int, help="startup: rows in the buffer")
    parser.add_argument("--drain-rows", type=int, help="drain: rows uploaded")
    parser.add_argument("--outages", type=float, nargs="+", metavar="S", help="outage lengths")
    parser.add_argument("--outage-repeats", type=int)
    parser.add_argument(
        "--latencies", type=float, nargs="+", metavar="MS", help="latency: sandbox round trips"
    )
    parser.add_argument("--latency-backlog", type=int, help="latency (a): queued readings")
    parser.add_argument("--latency-drain-rows", type=int, help="latency (b): buffered rows")
    parser.add_argument(
        "--outage-baseline", metavar="REF", help=f"e.g. {outage_resume.BASELINE_REF}"
    )
    parser.add_argument(
        "--workdir", type=Path, help="on a real disk for the wear figures (default: under repo)"
    )
    return parser.parse_args(argv)


def params_from(args: argparse.Namespace) -> Params:
    params = Params.quick() if args.quick else Params()
    overrides = {
        "repeats": args.repeats,
        "messages": args.messages,
        "burst": args.burst,
        "backlog_rows": args.backlog_rows,
        "drain_rows": args.drain_rows,
        "outages_s": args.outages,
        "outage_repeats": args.outage_repeats,
        "outage_baseline": args.outage_baseline,
        "latencies_ms": args.latencies,
        "latency_backlog": args.latency_backlog,
        "latency_drain_rows": args.latency_drain_rows,
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(params, key, value)
    return params


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = params_from(args)
    sections = args.only or list(SECTIONS)
    gateway_log.configure(level="warning", log_format="console", stream=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix=".bench-run-", dir=args.workdir or REPO))
    info = machine()
    print(f"benchmarks/run.py {'--quick ' if args.quick else ''}sections {', '.join(sections)}")
    print(f"machine: {info}\nparams: {asdict(params)}\nworkdir: {workdir}", flush=True)
    started = time.monotonic()
    timings: dict[str, float] = {}
    failed: dict[str, str] = {}
    try:
        with rig(workdir, params) as (broker, sandbox):
            ctx = Context(params, workdir, broker, sandbox)
            for name in sections:
                print(f"\n== {name}", flush=True)
                section_started = time.monotonic()
                try:
                    SECTION_FUNCTIONS[name](ctx)
                except Exception:
                    failed[name] = traceback.format_exc()
                    print(failed[name], file=sys.stderr, flush=True)
                timings[name] = time.monotonic() - section_started
                print(f"== {name}: {timings[name]:.0f} s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(format_table(ctx.figures))
    for note in ctx.notes:
        print(note)
    per_section = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    print(f"total {time.monotonic() - started:.0f} s ({per_section})")
    if ctx.problems:
        print("INTEGRITY PROBLEMS:\n  " + "\n  ".join(ctx.problems))
    if failed:
        print(f"FAILED SECTIONS: {', '.join(failed)}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "quick": args.quick,
                    "machine": info,
                    "params": asdict(params),
                    "seconds": timings,
                    "figures": [f.as_json() for f in ctx.figures],
                    "notes": ctx.notes,
                    "problems": ctx.problems,
                    "failed_sections": failed,
                },
                indent=1,
                ensure_ascii=False,
            )
        )
    return 1 if ctx.problems or failed else 0


if __name__ == "__main__":
    sys.exit(main())
