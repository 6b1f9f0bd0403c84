#!/usr/bin/env bash
# The main job: set up, train the default experiment (digits MLP) on its embedded data,
# export it to an artifact, and predict test digits through that artifact with the runtime.
# Extra arguments go to the experiment, e.g. `bash scripts/demo.sh --workdir runs/other`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
workdir=runs/digits_mlp
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  if [ "${args[i]}" = "--workdir" ]; then workdir="${args[i + 1]}"; fi
done
artifact="${JAXMINT_ARTIFACT:-artifacts/$(basename "$workdir")}"
.venv/bin/python experiments/digits_mlp.py "$@"
.venv/bin/jaxmint export "$workdir" --out "$artifact" --force
.venv/bin/python scripts/predict_digits.py "$artifact"
