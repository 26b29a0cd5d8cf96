#!/usr/bin/env bash
# Issue 7's GPU measurement in one device call (at most 11 minutes: TESTS_S=120 + EAGER_S=240 +
# COMPILE_S=300 s; usually less):
#   0. the propagation tests on the GPU (torch and Triton paths against the unfold formulation);
#   1. eager variants: ours / triton / reference / none (leave-one-out) per variant, the propagation
#      alone, 120-image evaluation, a profile of every step;
#   2. the compiled step (ours and none; the reference in fp32 for the ratio) and the real training
#      loop's data path end to end with the same options.
# Each part runs under a time limit that leaves the other its share; tables go to stdout, JSON, logs and
# profiles to OUT (8 files, the tool's limit).
# usage: scripts/device_benchmark.sh OUT [ROOT]    ROOT: prepared Kvasir for the end-to-end timing
#        (default: synthetic data, the same data path); BENCH_FLAGS="..." is appended to both runs
#        (e.g. "--device cpu --spatial-size 32 ..." to try the script on a CPU).
set -uo pipefail
OUT=${1:?usage: $0 OUT [ROOT]}; ROOT=${2:-}
# relative OUT and ROOT are read from the folder you call it from, before the cd into the repository
[[ "$OUT" = /* ]] || OUT="$PWD/$OUT"
[[ -z "$ROOT" || "$ROOT" = /* ]] || ROOT="$PWD/$ROOT"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
PY=$(command -v python3 || command -v python)
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2206
EXTRA=(${BENCH_FLAGS:-})
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT/gpu.txt"

# 0. the propagation tests, CUDA and Triton ones included: the timings below mean nothing if these fail
timeout "${TESTS_S:-120}" "$PY" -m pytest -q -p no:cacheprovider tests/models/test_feature_propagation.py \
  > "$OUT/cuda_tests.log" 2>&1
echo "propagation tests: exit $?"; tail -n 3 "$OUT/cuda_tests.log"

timeout "${EAGER_S:-240}" "$PY" scripts/benchmark.py --variants fp32,bf16,bf16+cl,bf16+cl+fused \
  --impls ours,triton,reference,none --profile "$OUT/profile_eager.txt" --json "$OUT/bench_eager.json" \
  "${EXTRA[@]}" > "$OUT/bench_eager.log" 2>&1
echo "eager part: exit $?"; grep -v "^\[\|USDT\|^ \|Traceback\|^  File" "$OUT/bench_eager.log" | tail -n 40

E2E=(--end-to-end --amp bf16 --channels-last --compile)
[ -n "$ROOT" ] && E2E+=(--root "$ROOT")
timeout "${COMPILE_S:-300}" "$PY" scripts/benchmark.py --variants fp32,bf16+cl+compile \
  --impls ours,reference,none --no-propagation --eval-images 0 "${E2E[@]}" --profile "$OUT/profile_compile.txt" \
  --json "$OUT/bench_compile.json" "${EXTRA[@]}" > "$OUT/bench_compile.log" 2>&1
echo "compile part: exit $?"; grep -v "^\[\|USDT\|^ \|Traceback\|^  File" "$OUT/bench_compile.log" | tail -n 25
