"""`blynk-gateway status`: what the buffer holds; read-only, safe while the daemon runs."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_OK
from gateway.errors import GatewayError


def add_parser(commands: Any) -> None:
    status = commands.add_parser("status", help="show what the buffer holds (safe while running)")
    status.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    status.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    from gateway.config import load_settings

    return asyncio.run(_status(load_settings(args.config).store.path, args.json))


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
