#!/usr/bin/env bash
# Run the test suite: ./scripts/test.sh [pytest args...]
# Installs what is missing first (mosquitto, .venv, the project) via scripts/bootstrap.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
