"""`blynk-gateway routes test|suggest`: check a mapping before any reading depends on it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gateway.cli.common import EXIT_FAILURE


def add_parser(commands: Any) -> None:
    routes = commands.add_parser("routes", help="try routes on a message, or suggest routes")
    verbs = routes.add_subparsers(dest="routes_command", required=True, metavar="VERB")
    test = verbs.add_parser("test", help="show what one message would become")
    test.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    test.add_argument("topic")
    test.add_argument("payload")
    test.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    return EXIT_FAILURE
