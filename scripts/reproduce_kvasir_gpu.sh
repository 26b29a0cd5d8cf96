#!/usr/bin/env bash
# The paper's Kvasir-SEG recipe (scripts/gazesup_kvasir_2_levels.sh) on one GPU with the speed options:
# bf16 autocast and torch.compile (falls back to eager if compilation fails before the first checkpoint).
# usage: scripts/reproduce_kvasir_gpu.sh ROOT EXP [extra flags]     (FAST="..." overrides the speed flags)
set -uo pipefail
ROOT=${1:?usage: $0 ROOT EXP [extra flags]}; EXP=${2:?usage: $0 ROOT EXP [extra flags]}; shift 2
REPO="$(cd "$(dirname "$0")/.." && pwd)"  # no cd: relative ROOT and EXP are read from your folder
FAST=${FAST-"--amp bf16 --compile"}
# shellcheck disable=SC2086
"$REPO/scripts/gazesup_kvasir_2_levels.sh" "$EXP" "$ROOT" $FAST --num_worker 8 --quiet "$@"
rc=$?
if [ $rc -ne 0 ] && [[ "$FAST" == *--compile* ]] && ! ls "$EXP"/0/kvasir/*/model_latest.pth >/dev/null 2>&1; then
  echo "run failed before its first checkpoint (exit $rc); retrying without --compile"
  "$REPO/scripts/gazesup_kvasir_2_levels.sh" "$EXP" "$ROOT" ${FAST//--compile/} --num_worker 8 --quiet "$@"
  rc=$?
fi
exit $rc
