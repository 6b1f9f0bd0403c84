#!/usr/bin/env bash
# Build the documentation site into site/ (offline), then open site/index.html.
# Usage: bash scripts/docs.sh [MKDOCS BUILD FLAGS]   e.g. bash scripts/docs.sh --site-dir /tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ./export -e ".[docs]"
# NO_MKDOCS_2_WARNING: Material's notice about MkDocs 2 needs no reply on every build.
NO_MKDOCS_2_WARNING=1 .venv/bin/python -m mkdocs build --strict "$@"
echo "open site/index.html"
