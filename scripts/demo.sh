#!/usr/bin/env bash
# The end-to-end demo: ./scripts/demo.sh [--seconds 30]
# Installs what is missing first (mosquitto, .venv, the project) via scripts/bootstrap.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash "$ROOT/scripts/bootstrap.sh"
exec "$ROOT/.venv/bin/blynk-gateway" demo --workdir "$ROOT/.demo" "$@"
