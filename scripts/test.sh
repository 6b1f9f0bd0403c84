#!/usr/bin/env bash
# Set up with the test extras, lint, then run the whole test suite.
# Extra arguments go to pytest. Exit code 5 (no tests collected) counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh "[dev]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
set +e
# Two workers (JAXMINT_TEST_WORKERS): most tests wait on subprocesses, servers and
# compiles, so two cores run the suite in about three quarters of the time.
# The 25 slowest tests are listed at the end: the suite's budget is 20 minutes on 2 cores.
.venv/bin/python -m pytest -n "${JAXMINT_TEST_WORKERS:-2}" --dist worksteal --durations=25 "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
