#!/usr/bin/env bash
# Set up everything the gateway needs on a fresh Debian machine, idempotently.
#   scripts/setup.sh          Python virtual environment at .venv with the gateway installed
#   scripts/setup.sh --test   also Mosquitto, PostgreSQL with TimescaleDB and the test tools
set -euo pipefail

cd "$(dirname "$0")/.."
want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

say() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        say "root is needed to run: $*"
        exit 1
    fi
}

apt_updated=0
apt_install() {
    local missing=()
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if [[ $apt_updated -eq 0 ]]; then
        say "apt-get update"
        as_root apt-get update -qq
        apt_updated=1
    fi
    say "installing ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    say "Python 3.11 or newer is needed; found $("$python" --version 2>&1)"
    exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
    say "creating .venv"
    "$python" -m venv .venv
fi

stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)-$want_test
if [[ ! -f $stamp ]]; then
    say "installing Python packages into .venv"
    extras=""
    [[ $want_test -eq 1 ]] && extras="[test]"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    .venv/bin/python -c 'import gateway.cli.app' # fails loudly when the install did not work
    rm -f .venv/.installed-*
    touch "$stamp"
fi

if [[ $want_test -eq 1 ]]; then
    apt_install mosquitto mosquitto-clients
    # Debian's package starts a system broker on port 1883; tests start their own brokers.
    if command -v systemctl >/dev/null && systemctl is-active --quiet mosquitto 2>/dev/null; then
        as_root systemctl stop mosquitto || true
    fi
    scripts/timescaledb.sh install
fi
