"""Time from "cloud back" to "first batch accepted" after an outage (issue #7).

The daemon (`python -m gateway run`, a subprocess, default flush settings) uploads to the
sandbox cloud; the cloud is taken "down" (its port refuses connections, as when the uplink
or DNS is gone), readings are published over MQTT meanwhile, and after the outage the
cloud comes back. Measured: seconds from the moment it listens again to the first batch it
accepts, per outage length.

The baseline is the same daemon at an earlier commit (`--baseline-ref`, default: the last
commit before probing existed), run from a git worktree in this same run, with the same
broker, sandbox and outages. Figures are medians over `--repeats`.

    .venv/bin/python benchmarks/outage_resume.py                    # 10 s, 2 min, 6 min
    .venv/bin/python benchmarks/outage_resume.py --outages 10 30 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.testing.broker import MosquittoBroker
from gateway.testing.process import GatewayExited, GatewayProcess, daemon_config, write_config
from gateway.testing.publisher import AckedPublisher
from gateway.testing.sandbox import SandboxCloud
from gateway.testing.sandbox_run import SandboxThread

REPO = Path(__file__).resolve().parent.parent
DEVICES = {101: {5: "double"}}
ROUTES = [{"topic": "bench/temperature", "device_id": 101, "datastream_id": 5}]
BACKLOG = 3000
BASELINE_REF = "f2a03e2"  # main before issue #7: backoff capped at 300 s, full jitter


def wait_for(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout_s} s")
        time.sleep(0.05)


def one_outage(
    workdir: Path,
    broker: MosquittoBroker,
    sandbox: SandboxThread,
    outage_s: float,
    variant: Variant,
) -> float:
    """Seconds from the cloud listening again to the first batch it accepts."""
    db = workdir / "buffer.db"
    for leftover in workdir.glob("buffer.db*"):
        leftover.unlink()
    config = daemon_config(broker.port, sandbox.base_url, db, ROUTES, log={"level": "info"})
    if not variant.knows_clock:
        del config["clock"]  # a daemon from before [clock] refuses the section
    path = write_config(workdir / "gateway.toml", config)
    with GatewayProcess(
        path, workdir / "gateway.log", env=variant.env, python=variant.python
    ) as daemon:
        daemon.start()
        daemon.wait_for_event("mqtt_connected", timeout_s=30)
        publisher = AckedPublisher(broker.host, broker.port, client_id="bench-publisher")
        publisher.connect()
        try:
            before = sandbox.call(lambda c: len(c.accepted))
            now_ms = sandbox.call(lambda c: c.now_ms())
            publisher.publish_many([("bench/temperature", f'{{"value":1,"ts":{now_ms}}}')])
            wait_for(lambda: sandbox.call(lambda c: len(c.accepted)) > before, 30, "warm-up")
            sandbox.call(lambda c: c.set_fault("down"))
            started = time.monotonic()
            now_ms = sandbox.call(lambda c: c.now_ms())
            publisher.publish_many(
                ("bench/temperature", f'{{"value":{i},"ts":{now_ms + i}}}') for i in range(BACKLOG)
            )
            time.sleep(max(0.0, outage_s - (time.monotonic() - started)))
            accepted = sandbox.call(lambda c: len(c.accepted))
            sandbox.call(lambda c: c.set_fault("none"))
            back = time.monotonic()
            try:
                wait_for(
                    lambda: sandbox.call(lambda c: len(c.accepted)) > accepted, 600, "first batch"
                )
            except TimeoutError:
                print(daemon.tail(40), flush=True)
                raise
            resumed_s = time.monotonic() - back
            try:
                offline = daemon.wait_for_event("went_offline", timeout_s=1)
                said = f"went_offline error={offline.get('error')!r}"
            except GatewayExited:  # an outage shorter than the daemon's first attempt
                said = "no went_offline: it never tried during the outage"
            print(f"    ({variant.name}: {said})", flush=True)
            return resumed_s
        finally:
            publisher.close()
            daemon.stop()


@dataclass(frozen=True)
class Variant:
    name: str
    env: dict[str, str] = field(default_factory=dict)
    python: list[str] | None = None
    knows_clock: bool = True


def baseline_variant(ref: str, into: Path) -> Variant:
    """The daemon of an earlier commit: its tree first on the path, this venv's packages
    after it, and `-S -P` so the venv's editable install (this checkout) is not loaded."""
    baseline_tree(ref, into)
    packages = [p for p in sys.path if p.endswith("site-packages")]
    path = os.pathsep.join([str(into), *packages])
    return Variant(
        f"baseline {ref}",
        {"PYTHONPATH": path},
        [sys.executable, "-S", "-P"],
        knows_clock=(into / "gateway" / "clock.py").exists(),
    )


def baseline_tree(ref: str, into: Path) -> Path:
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(into), ref], check=True
    )
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outages", type=float, nargs="+", default=[10, 120, 360])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="outage-bench-") as tmp:
        tmp_path = Path(tmp)
        variants = [Variant("now")]
        if not args.no_baseline:
            variants.insert(0, baseline_variant(args.baseline_ref, tmp_path / "baseline"))
        broker = MosquittoBroker(tmp_path / "broker")
        broker.start()
        # One sandbox serves every run: its daily quota must not be what ends a run.
        sandbox = SandboxThread(SandboxCloud(DEVICES, daily_points_limit=10_000_000))
        sandbox.start()
        results: dict[tuple[str, float], list[float]] = {}
        try:
            for repeat in range(args.repeats):
                for outage_s in args.outages:
                    for variant in variants:
                        workdir = tmp_path / f"run-{repeat}-{outage_s:g}-{variant.name.split()[0]}"
                        workdir.mkdir()
                        seconds = one_outage(workdir, broker, sandbox, outage_s, variant)
                        results.setdefault((variant.name, outage_s), []).append(seconds)
                        name = variant.name
                        line = (
                            f"{name:>22}  outage {outage_s:6.0f} s  resumed after {seconds:6.1f} s"
                        )
                        print(line, flush=True)
        finally:
            sandbox.stop()
            broker.stop()
            if not args.no_baseline:
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(REPO),
                        "worktree",
                        "remove",
                        "--force",
                        str(tmp_path / "baseline"),
                    ],
                    check=False,
                )
        print()
        print(f"| outage | {' | '.join(v.name for v in variants)} | now / baseline (medians) |")
        print(f"|---|{'---|' * len(variants)}---|")
        for outage_s in args.outages:
            runs = [results[(v.name, outage_s)] for v in variants]
            medians = [statistics.median(r) for r in runs]
            ratio = medians[-1] / medians[0] if len(medians) > 1 else float("nan")
            cells = " | ".join(
                f"{statistics.median(r):.1f} s (max {max(r):.1f}, n={len(r)})" for r in runs
            )
            print(f"| {outage_s:g} s | {cells} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
