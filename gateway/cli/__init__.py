"""`blynk-gateway` command line: run, check-config, status, dead-letters, routes, sandbox, demo.

One module per command group beside this one (status.py, dead_letters.py, routes.py), each
with `add_parser(commands)` and `run(args)`; this module only assembles and dispatches.

Exit codes: 0 success, 2 usage or configuration error (the message names the key),
1 any other failure. Errors are one readable line on stderr, never a traceback, because
operators read them in `journalctl` or over SSH.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway import __version__
from gateway.cli import dead_letters as dead_letters_command
from gateway.cli import routes as routes_command
from gateway.cli import status as status_command
from gateway.cli.common import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK
from gateway.errors import ConfigError, GatewayError


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

    status_command.add_parser(commands)
    dead_letters_command.add_parser(commands)
    routes_command.add_parser(commands)

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
    sandbox.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        help="answer every token and import request this late, like a cloud a round trip away",
    )
    sandbox.add_argument("--jitter-ms", type=float, default=0.0, help="± this much, uniformly")

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
        mqtt = settings.mqtt
        tls = ""
        if mqtt.tls:
            tls = " over TLS" + (" with a client certificate" if mqtt.cert_file else "")
        print(
            f"{args.config}: OK ({len(settings.routes)} routes, broker "
            f"{mqtt.host}:{mqtt.port}{tls}, cloud {settings.cloud.server}, "
            f"buffer {settings.store.path})"
        )
        for route in settings.routes:
            if (problem := route.catch_all_problem()) is not None:
                print(f"blynk-gateway: warning: route {route.topic!r} {problem}", file=sys.stderr)
        return EXIT_OK
    if args.command == "run":
        from gateway.app import run_until_signalled

        settings = load_settings(args.config)
        log.configure(settings.log.level, settings.log.format, secrets=settings.secret_values())
        return asyncio.run(run_until_signalled(settings, args.config))
    if args.command == "status":
        return status_command.run(args)
    if args.command == "dead-letters":
        return dead_letters_command.run(args)
    if args.command == "routes":
        return routes_command.run(args)
    if args.command == "sandbox":
        return _sandbox(args)
    if args.command == "demo":
        from gateway.testing.demo import run_demo

        return run_demo(args.workdir, args.seconds)
    raise AssertionError(args.command)  # pragma: no cover - argparse enforces the choices


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
    try:
        cloud.set_latency(args.latency_ms, jitter_ms=args.jitter_ms)
    except ValueError as exc:
        raise ConfigError(f"--latency-ms/--jitter-ms: {exc}") from exc
    return run_sandbox(args.host, args.port, cloud)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
