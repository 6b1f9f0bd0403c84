#!/usr/bin/env bash
# Create .venv (if missing) and install jaxmint into it, editable.
# Usage: bash scripts/setup.sh [EXTRAS]   e.g. bash scripts/setup.sh "[dev]"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ./export -e ".${1:-}"

# The test extras also set up what the Node.js and browser tests use: export/js's npm
# packages and its browser bundle (when npm is here), and Debian's chromium,
# postgresql and wrk (as root, when apt-get is here; the PostgreSQL sweep tests start
# their own server, and the serving benchmarks' smoke tests load servers with wrk).
# The tests say why they skip where one is missing. (MLServer, the serving peer, is
# installed by benchmarks/serving_peers.py in a virtual environment of its own.)
if [[ "${1:-}" == *dev* ]]; then
  if command -v npm >/dev/null; then
    lock=export/js/package-lock.json
    if [ ! -f export/js/node_modules/.package-lock.json ] || [ "$lock" -nt export/js/node_modules/.package-lock.json ]; then
      (cd export/js && npm ci --no-audit --no-fund --loglevel=error)
    fi
    (cd export/js && npm run --silent build)
  fi
  missing=()
  command -v chromium >/dev/null || missing+=(chromium)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  command -v wrk >/dev/null || missing+=(wrk)
  if [ "${#missing[@]}" -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") \
      >/dev/null || echo "setup: could not install ${missing[*]}; their tests will skip" >&2
  fi
fi
