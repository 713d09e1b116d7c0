#!/usr/bin/env bash
# Set up the gateway, then run it on embedded defaults with a simulated site.
# Extra arguments go to `gateway demo` (see `.venv/bin/gateway demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/gateway demo "$@"
