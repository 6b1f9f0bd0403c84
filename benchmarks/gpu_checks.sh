#!/usr/bin/env bash
# The checks an accelerator is needed for, in one run that fits a short device lease.
#
#   pip install --no-deps -e . -e ./export && bash benchmarks/gpu_checks.sh
#
# 1. MFU of the transformer (benchmarks/gpu_transformer.py): unrolled blocks, and
#    scanned blocks with remat="full" (its peak memory from the allocator beside it).
# 2. The numerical tests of remat, scanned layers and the chunked attention and
#    cross-entropy on the device, at full float32 matmul precision.
# Each writes its log (and result file) under $OUT (default benchmarks/results/gpu),
# with one line per check in summary.txt; a check that fails or runs out of time does
# not stop the others. SIZE=tiny runs the small model (a smoke run anywhere).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
py="${PYTHON:-python}"
size=()
[ -n "${SIZE:-}" ] && size=(--size "$SIZE")

check() {  # check NAME SECONDS COMMAND...: run it, log it, note how it ended
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$out/summary.txt"
}

: >"$out/summary.txt"
{ nvidia-smi 2>&1 || true; "$py" -c "import jax; print(jax.__version__, jax.devices())"; } \
  >"$out/device.txt" 2>&1
check mfu_unrolled 240 "$py" benchmarks/gpu_transformer.py "${size[@]}" --out "$out/mfu_unrolled.json"
check mfu_scanned_remat_full 240 "$py" benchmarks/gpu_transformer.py "${size[@]}" \
  --scan-layers --remat full --out "$out/mfu_scanned_remat_full.json"
check numerics 180 env JAX_DEFAULT_MATMUL_PRECISION=highest "$py" -m pytest -q -p no:cacheprovider \
  tests/models/test_remat.py tests/models/test_chunked_attention.py tests/losses/test_chunked.py
