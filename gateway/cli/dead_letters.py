"""`blynk-gateway dead-letters list|retry|purge`: readings the cloud will not take, and why.

`list` (also what `dead-letters` alone does) shows them, `retry` puts them back in the
buffer (with `--datastream-to` / `--device-to` to fix a wrong id first), `purge` deletes
them. All three take the same filters and are safe while the daemon runs: each change is
a short SQLite transaction beside the daemon's (WAL), and the daemon's flush loop notices
retried rows on its next pass (`Store.pending_streams`). Retried readings take the normal
path, so the cloud's age and quota rules apply when they are sent; those already too old
for the cloud, and raw payloads that never became a reading, stay where they are.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.common import EXIT_FAILURE, EXIT_OK
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.config import Settings
    from gateway.store import DeadLetter, DeadLetterFilter, Store

_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
VERBS = ("list", "retry", "purge")


def parse_duration_s(text: str) -> float:
    """`90s`, `15m`, `2h`, `3d`, `1w`, or several at once (`1d12h`), in seconds."""
    cleaned = text.strip().lower()
    parts = _DURATION.findall(cleaned)
    if not parts or "".join(n + u for n, u in parts) != cleaned:
        raise argparse.ArgumentTypeError(f"not a duration like 2h or 3d: {text!r}")
    return sum(float(number) * _UNITS_S[unit] for number, unit in parts)


def _filters(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every verb takes. On a verb they default to SUPPRESS, so one given
    before the verb (`dead-letters --reason expired list`) is not overwritten."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--config", "-c", type=Path, default=default(None), help="TOML config file")
    parser.add_argument("--device", type=int, default=default(None), help="device id")
    parser.add_argument("--datastream", type=int, default=default(None), help="datastream id")
    parser.add_argument("--reason", default=default(None), help="reason code, e.g. expired")
    parser.add_argument(
        "--older-than",
        type=parse_duration_s,
        default=default(None),
        metavar="DURATION",
        help="dead-lettered longer ago than this (2h, 3d, 1w)",
    )
    parser.add_argument(
        "--newer-than",
        type=parse_duration_s,
        default=default(None),
        metavar="DURATION",
        help="dead-lettered within this (2h, 3d, 1w)",
    )


def add_parser(commands: Any) -> None:
    dead = commands.add_parser(
        "dead-letters",
        help="list, retry or purge readings the cloud will not take",
        description="Without a verb: list.",
    )
    _filters(dead, top=True)
    dead.add_argument("--limit", type=int, default=50, help="list: at most this many")
    dead.add_argument("--json", action="store_true", help="list: one JSON object per line")
    verbs = dead.add_subparsers(dest="verb", metavar="VERB")
    listing = verbs.add_parser("list", help="show dead letters, oldest first, and a summary")
    _filters(listing, top=False)
    listing.add_argument("--limit", type=int, default=argparse.SUPPRESS)
    listing.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    retry = verbs.add_parser("retry", help="put dead letters back in the buffer")
    _filters(retry, top=False)
    retry.add_argument("--device-to", type=int, help="send them to this device id instead")
    retry.add_argument("--datastream-to", type=int, help="send them to this datastream id")
    retry.add_argument("--dry-run", action="store_true", help="count only, change nothing")
    purge = verbs.add_parser("purge", help="delete dead letters for good")
    _filters(purge, top=False)
    purge.add_argument("--all", action="store_true", help="needed to purge without a filter")
    purge.add_argument("--dry-run", action="store_true", help="count only, change nothing")


def run(args: argparse.Namespace) -> int:
    from gateway.config import load_settings

    if args.config is None:
        raise ConfigError("dead-letters needs --config FILE")
    settings = load_settings(args.config)
    return asyncio.run(_run(settings, args))


def selection_of(args: argparse.Namespace, now_ms: int) -> DeadLetterFilter:
    from gateway.store import DeadLetterFilter

    return DeadLetterFilter(
        device_id=args.device,
        datastream_id=args.datastream,
        reason=args.reason,
        dead_before_ms=None if args.older_than is None else now_ms - int(args.older_than * 1000),
        dead_after_ms=None if args.newer_than is None else now_ms - int(args.newer_than * 1000),
    )


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    from gateway.store import Store

    path = settings.store.path
    if not path.exists():
        print(f"blynk-gateway: no buffer database at {path}", file=sys.stderr)
        return EXIT_FAILURE
    now_ms = time.time_ns() // 1_000_000
    selection = selection_of(args, now_ms)
    store = await Store.open(path)
    try:
        if args.verb == "retry":
            return await _retry(store, settings, selection, args, now_ms)
        if args.verb == "purge":
            return await _purge(store, selection, args)
        return await _list(store, selection, args.limit, args.json)
    finally:
        await store.close()


async def _list(store: Store, selection: DeadLetterFilter, limit: int, as_json: bool) -> int:
    letters = await store.dead_letters(limit, selection=selection)
    counts = await store.dead_letter_counts(selection)
    if as_json:
        for letter in letters:
            print(json.dumps(_as_dict(letter)))
        return EXIT_OK
    rows = [["id", "dead at", "reason", "device", "stream", "ts", "value", "topic", "detail"]]
    rows += [_row(letter) for letter in letters]
    widths = [min(40, max(len(row[i]) for row in rows)) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell if len(cell) <= 40 else cell[:37] + "..." for cell in row]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
    total = sum(counts.values())
    summary = ", ".join(f"{reason} {count:,}" for reason, count in counts.items())
    shown = f"{len(letters):,} shown of {total:,}" if total > len(letters) else f"{total:,}"
    print(f"-- {shown} dead letters" + (f": {summary}" if summary else ""))
    return EXIT_OK


async def _retry(
    store: Store,
    settings: Settings,
    selection: DeadLetterFilter,
    args: argparse.Namespace,
    now_ms: int,
) -> int:
    from gateway.store import Retarget

    if args.dry_run:
        counts = await store.dead_letter_counts(selection)
        print(f"would look at {sum(counts.values()):,} dead letters: {counts}")
        return EXIT_OK
    result = await store.retry_dead_letters(
        selection,
        Retarget(device_id=args.device_to, datastream_id=args.datastream_to),
        oldest_sendable_ms=settings.cloud.oldest_sendable_ms(now_ms),
    )
    print(f"requeued {result.requeued:,} readings (the daemon sends them on its next pass)")
    if result.already_buffered:
        print(f"{result.already_buffered:,} were already buffered (dead letters removed)")
    if result.too_old:
        print(
            f"{result.too_old:,} left as they are: older than the cloud accepts "
            f"(cloud.max_age_days {settings.cloud.max_age_days:g}, less the margin)"
        )
    if result.not_retryable:
        reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(result.not_retryable.items()))
        print(
            f"{sum(result.not_retryable.values()):,} left as they are: raw payloads that "
            f"never became a reading ({reasons}); fix the publisher or the route"
        )
    return EXIT_OK


async def _purge(store: Store, selection: DeadLetterFilter, args: argparse.Namespace) -> int:
    from gateway.store import DeadLetterFilter

    if selection == DeadLetterFilter() and not args.all:
        print(
            "blynk-gateway: purge without a filter deletes every dead letter: add --all",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.dry_run:
        counts = await store.dead_letter_counts(selection)
        print(f"would purge {sum(counts.values()):,} dead letters: {counts}")
        return EXIT_OK
    print(f"purged {await store.purge_dead_letters(selection):,} dead letters")
    return EXIT_OK


def _as_dict(letter: DeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "dead_at": _iso(letter.dead_at_ms),
        "reason": letter.reason,
        "device_id": letter.device_id,
        "datastream_id": letter.datastream_id,
        "ts": letter.ts_ms,
        "value": letter.value_json,
        "topic": letter.topic,
        "detail": letter.detail,
    }


def _row(letter: DeadLetter) -> list[str]:
    def text(value: object) -> str:
        return "" if value is None else str(value)

    return [
        str(letter.id),
        _iso(letter.dead_at_ms),
        letter.reason,
        text(letter.device_id),
        text(letter.datastream_id),
        "" if letter.ts_ms is None else _iso(letter.ts_ms),
        text(letter.value_json),
        text(letter.topic),
        text(letter.detail),
    ]


def _iso(epoch_ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_ms / 1000))
