"""`blynk-gateway` command line: run, check-config, status, dead-letters, sandbox, demo.

Exit codes: 0 success, 2 usage or configuration error (the message names the key),
1 any other failure. Errors are one readable line on stderr, never a traceback, because
operators read them in `journalctl` or over SSH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.errors import ConfigError, GatewayError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blynk-gateway",
        description="Store-and-forward gateway: local MQTT sensors -> SQLite buffer -> Blynk.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the gateway in the foreground")
    run.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")

    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")

    status = commands.add_parser("status", help="show what the buffer holds (safe while running)")
    status.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    dead = commands.add_parser("dead-letters", help="list readings the cloud will never take")
    dead.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--reason", default=None, help="only this exact reason")

    sandbox = commands.add_parser("sandbox", help="run a local Blynk-compatible cloud")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8080)
    sandbox.add_argument(
        "--devices",
        default="101:5,6;102:1,2",
        help="known devices and datastreams, e.g. '101:5=double,6=string;102:1'",
    )
    sandbox.add_argument("--client-id", default="sandbox-client")
    sandbox.add_argument("--client-secret", default="sandbox-secret")
    sandbox.add_argument("--daily-points-limit", type=int, default=10_000)
    sandbox.add_argument("--max-age-days", type=int, default=30)

    demo = commands.add_parser("demo", help="end-to-end demo with a private broker and cloud")
    demo.add_argument("--workdir", type=Path, default=Path(".demo"))
    demo.add_argument("--seconds", type=float, default=30.0, help="how long sensors publish")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"blynk-gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as exc:
        print(f"blynk-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from gateway import log
    from gateway.config import load_settings

    if args.command == "check-config":
        settings = load_settings(args.config)
        print(
            f"{args.config}: OK ({len(settings.routes)} routes, broker "
            f"{settings.mqtt.host}:{settings.mqtt.port}, cloud {settings.cloud.server}, "
            f"buffer {settings.store.path})"
        )
        return EXIT_OK
    if args.command == "run":
        from gateway.app import run_until_signalled

        settings = load_settings(args.config)
        log.configure(settings.log.level, settings.log.format, secrets=settings.secret_values())
        return asyncio.run(run_until_signalled(settings))
    if args.command == "status":
        return asyncio.run(_status(load_settings(args.config).store.path, args.json))
    if args.command == "dead-letters":
        path = load_settings(args.config).store.path
        return asyncio.run(_dead_letters(path, args.limit, args.reason))
    if args.command == "sandbox":
        return _sandbox(args)
    if args.command == "demo":
        from gateway.testing.demo import run_demo

        return run_demo(args.workdir, args.seconds)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


async def _status(path: Path, as_json: bool) -> int:
    from gateway.store import Store

    if not path.exists():  # noqa: ASYNC240 - one stat before opening, not a hot path
        raise GatewayError(f"no buffer database at {path} (has the gateway run yet?)")
    store = await Store.open(path)
    try:
        counts = await store.counts()
    finally:
        await store.close()
    report = {"db": str(path), **counts}
    if as_json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:>15}: {value}")
    return EXIT_OK


async def _dead_letters(path: Path, limit: int, reason: str | None) -> int:
    from gateway.store import Store

    store = await Store.open(path)
    try:
        letters = await store.dead_letters(limit, reason)
    finally:
        await store.close()
    for letter in letters:
        print(
            f"{letter.id}\tdevice={letter.device_id}\tdatastream={letter.datastream_id}\t"
            f"ts={letter.ts_ms}\tvalue={letter.value_json}\ttopic={letter.topic}\t"
            f"reason={letter.reason}\tdetail={letter.detail or ''}"
        )
    return EXIT_OK


def _sandbox(args: argparse.Namespace) -> int:
    try:
        from gateway.testing.sandbox import SandboxCloud
        from gateway.testing.sandbox_run import parse_devices, run_sandbox
    except ImportError as exc:  # aiohttp is an optional extra
        raise GatewayError(
            f"the sandbox needs the 'sandbox' extra: pip install 'blynk-edge-gateway[sandbox]' "
            f"({exc})"
        ) from exc
    cloud = SandboxCloud(
        parse_devices(args.devices),
        client_id=args.client_id,
        client_secret=args.client_secret,
        daily_points_limit=args.daily_points_limit,
        max_age_days=args.max_age_days,
    )
    return run_sandbox(args.host, args.port, cloud)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
