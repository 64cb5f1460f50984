#!/usr/bin/env bash
# Prune on one node with all its GPUs: data-parallel calibration (torchrun), then the rewrite.
#   scripts/prune-node.sh RECIPE.yaml OUT_DIR [extra reap flags...]
#   NGPU=4 scripts/prune-node.sh configs/minimax-m2-reap-0.30.yaml MiniMax-M2-REAP-162B-A10B
# The stats file (OUT_DIR.stats.safetensors) is written after every layer: rerun the same command to resume.
set -euo pipefail
recipe=${1:?usage: $0 RECIPE.yaml OUT_DIR [reap flags]}
out=${2:?usage: $0 RECIPE.yaml OUT_DIR [reap flags]}
shift 2
ngpu=${NGPU:-$(nvidia-smi -L 2>/dev/null | wc -l)}
[ "$ngpu" -ge 1 ] || { echo "no GPU found; set NGPU" >&2; exit 2; }
stats="${out%/}.stats.safetensors"
resume=()
[ -f "$stats" ] && resume=(--resume)
torchrun --standalone --nproc-per-node "$ngpu" -m reap calibrate --config "$recipe" --out "$stats" "${resume[@]}" "$@"
reap prune --config "$recipe" --stats "$stats" --out "$out" "$@"
