#!/usr/bin/env bash
# Make this checkout ready for tests: the mosquitto broker (Debian package) and .venv with
# the project installed editable with its dev extras. Safe to run repeatedly: pip only runs
# again when pyproject.toml (or the venv's Python) changed; BOOTSTRAP_FORCE=1 forces it.
# PYTHON=/path/to/python3.x picks the interpreter used to create .venv (>= 3.11).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() {
    printf '[bootstrap] ERROR: %s\n' "$*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

# ------------------------------------------------------------------ mosquitto
have_mosquitto() {
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}

ensure_mosquitto() {
    if have_mosquitto; then
        return 0
    fi
    local hint="install the Mosquitto MQTT broker (>= 2.0), e.g. 'sudo apt-get install -y mosquitto'"
    command -v apt-get >/dev/null 2>&1 || die "mosquitto not found and apt-get is not available: $hint"
    log "mosquitto not found: installing the Debian package 'mosquitto' (tests start private brokers with it)"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q; then
        die "apt-get update failed (not root and no passwordless sudo?): $hint"
    fi
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends mosquitto; then
        die "apt-get install mosquitto failed: $hint"
    fi
    have_mosquitto || die "mosquitto still not found after apt-get install: $hint"
}

# ------------------------------------------------------------ other test tools
ensure_tool() { # command debian-package
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "'$1' not found and apt-get is not available: install '$2'"
    log "'$1' not found: installing the Debian package '$2' (the tests use it)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q ||
        die "apt-get update failed (not root and no passwordless sudo?): install '$2'"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" ||
        die "apt-get install $2 failed"
}

# --------------------------------------------------------------------- python
python_ok() {
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

find_python() {
    local c
    for c in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
        [ -n "$c" ] || continue
        command -v "$c" >/dev/null 2>&1 || continue
        if python_ok "$c"; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    if [ -x .venv/bin/python ]; then
        python_ok .venv/bin/python ||
            die ".venv uses $(.venv/bin/python --version 2>&1); Python >= 3.11 is required: remove .venv and re-run"
        return 0
    fi
    local py
    py="$(find_python)" || die "no Python >= 3.11 found (tried \$PYTHON, python3, python3.13, python3.12, python3.11)"
    log "creating .venv with $py ($("$py" --version 2>&1))"
    if ! "$py" -m venv .venv; then
        rm -rf .venv
        if command -v apt-get >/dev/null 2>&1; then
            log "the venv module is missing: installing Debian's python3-venv"
            as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
                as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv &&
                "$py" -m venv .venv && return 0
            rm -rf .venv
        fi
        die "'$py -m venv' failed; on Debian install the venv module: 'sudo apt-get install -y python3-venv'"
    fi
}

install_project() {
    local stamp_file=.venv/.bootstrap-stamp stamp
    stamp="$(sha256sum <pyproject.toml | cut -d' ' -f1) $(.venv/bin/python -c 'import sys; print(sys.version)' | head -n1)"
    if [ "${BOOTSTRAP_FORCE:-0}" != "1" ] && [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ]; then
        return 0
    fi
    log "installing the project into .venv: pip install -e \".[dev]\""
    .venv/bin/python -m pip install --quiet -e ".[dev]" ||
        die "pip install -e \".[dev]\" failed (see pip's output above)"
    printf '%s\n' "$stamp" >"$stamp_file"
}

ensure_mosquitto
# The tests also use: openssl (a self-signed certificate for the TLS probe test, and the
# CA, broker and client certificates of the MQTT-over-TLS tests: gateway/testing/certs.py;
# mosquitto_passwd comes with the mosquitto package), and
# unshare + ip (the network watcher is tested in a private network namespace), and
# systemd-analyze (the unit's verify and security score; the package only adds the tools,
# it does not replace the container's init).
ensure_tool openssl openssl
ensure_tool unshare util-linux
ensure_tool ip iproute2
ensure_tool systemd-analyze systemd
ensure_venv
install_project
