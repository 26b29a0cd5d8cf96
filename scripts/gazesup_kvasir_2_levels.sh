#!/usr/bin/env bash
# The paper's Kvasir-SEG run (2 levels, prop consistency). Usage: scripts/gazesup_kvasir_2_levels.sh EXP ROOT [extra flags]
set -euo pipefail
EXP=${1:?usage: $0 EXP ROOT [extra flags]}; ROOT=${2:?usage: $0 EXP ROOT [extra flags]}; shift 2
cd "$(dirname "$0")/.."
python run.py -m gaze_sup --data kvasir --model unet -bs 8 --exp_path "$EXP" --root "$ROOT" --spatial_size 224 \
  --in_channels 3 --opt sgd --lr 1e-2 --lr_min 1e-4 --lr_scheduler cos --max_ite 15000 --num_levels 2 \
  --cons_mode prop --cons_weight 3 --data_size_rate 1 --device 0 --seed 0 "$@"
