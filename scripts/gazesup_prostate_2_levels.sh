#!/usr/bin/env bash
# The paper's NCI-ISBI prostate run (2 levels, prop consistency): configs/prostate_gaze_sup_2_levels.yaml, a delta
# on the paper's recipe (configs/recipes/paper.yaml). Usage: scripts/gazesup_prostate_2_levels.sh EXP ROOT [extra flags]
# Relative EXP and ROOT are read from the folder you call it from.
set -euo pipefail
EXP=${1:?usage: $0 EXP ROOT [extra flags]}; ROOT=${2:?usage: $0 EXP ROOT [extra flags]}; shift 2
REPO="$(cd "$(dirname "$0")/.." && pwd)"
python "$REPO/run.py" --config "$REPO/configs/prostate_gaze_sup_2_levels.yaml" --exp_path "$EXP" --root "$ROOT" \
  --device 0 "$@"
