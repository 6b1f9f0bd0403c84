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
