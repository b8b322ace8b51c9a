"""`blynk-gateway dead-letters`: readings the cloud will never take, and why."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_OK


def add_parser(commands: Any) -> None:
    dead = commands.add_parser("dead-letters", help="list readings the cloud will never take")
    dead.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    dead.add_argument("--limit", type=int, default=50)
    dead.add_argument("--reason", default=None, help="only this exact reason")


def run(args: argparse.Namespace) -> int:
    from gateway.config import load_settings

    path = load_settings(args.config).store.path
    return asyncio.run(_dead_letters(path, args.limit, args.reason))


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
