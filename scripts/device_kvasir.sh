#!/usr/bin/env bash
# One short GPU lease: launch the Kvasir reproduction detached (setsid), wait for it up to TOTAL seconds,
# and, if it finished with time to spare, run the speed benchmark. Copies what is worth keeping to $OUT
# (logs, metrics.json, benchmark JSON), never the checkpoints. A second call with `collect` waits again.
# usage: scripts/device_kvasir.sh start|collect TOTAL_SECONDS [ROOT]
set -uo pipefail
MODE=${1:?start|collect}; TOTAL=${2:?seconds}; ROOT=${3:-}
[[ -z "$ROOT" || "$ROOT" = /* ]] || ROOT="$PWD/$ROOT"  # relative to your folder, resolved before the cd
cd "$(dirname "$0")/.."
ROOT=${ROOT:-.data/kvasir}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/repro /tmp/bin
LOG=/tmp/repro/run.log
export PYTHONUNBUFFERED=1
command -v python > /dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
export PATH=/tmp/bin:$PATH
running() { pgrep -f "reproduce_kvasir_gpu.sh" > /dev/null; }
if [ "$MODE" = start ]; then
  nvidia-smi -L; python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
  setsid nohup bash scripts/reproduce_kvasir_gpu.sh "$ROOT" /tmp/repro/exp > "$LOG" 2>&1 < /dev/null &
  sleep 2
fi
while running && [ $SECONDS -lt $((TOTAL - 20)) ]; do sleep 3; done
running && echo "STILL RUNNING after ${SECONDS}s" || echo "RUN FINISHED after ${SECONDS}s"
grep -E "ms/it|\| test|final|rror|retrying" "$LOG" | grep -E "00/15000|000 \| test|test|final|rror|retrying" | tail -n 40
cp "$LOG" "$OUT/run.log"
for f in metrics.json per_image_metrics.csv config.yaml; do cp /tmp/repro/exp/0/kvasir/*/$f "$OUT/" 2>/dev/null; done
left=$((TOTAL - SECONDS))
if ! running && [ $left -gt 75 ]; then
  timeout $((left - 15)) python scripts/benchmark.py --variants fp32,bf16 --warmup 3 --iters 10 \
    --eval-images 120 --json "$OUT/benchmark.json" 2>&1 | tail -n 25
fi
