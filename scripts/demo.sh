#!/usr/bin/env bash
# The main job: set up, then train the default experiment (digits MLP) on its embedded data.
# Extra arguments go to the experiment, e.g. `bash scripts/demo.sh --workdir runs/other`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python experiments/digits_mlp.py "$@"
