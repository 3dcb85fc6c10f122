#!/usr/bin/env bash
# Time to quality: train the CPU default config for 10, 20 and 40 minutes of training-loop time
# (one run, resumed at each mark), keeping the exported model at every mark and sampling the same
# prompts and seeds from each. Run it alone: other jobs on the same cores slow training many times.
# With MARKS="30" it runs exactly the README's main command (python train.py: configs/cpu.yaml as
# shipped, its 30-minute budget and its validations); only OVERRIDES, named in any table, differ.
#
#   bash bench/time_to_quality.sh [RUN_DIR]        (default outputs/runs/time-to-quality)
#   MARKS="10 20 30" bash bench/time_to_quality.sh  (minutes at which to keep a model; default 10 20 40)
#   OVERRIDES="train.text_encoder_lr=0" bash bench/time_to_quality.sh  (config overrides, for ablations)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-outputs/runs/time-to-quality}
CONFIG=configs/cpu.yaml
previous=0
for minutes in ${MARKS:-10 20 40}; do
  segment=$((minutes - previous))
  resume=()
  [ "$previous" -gt 0 ] && resume=(--resume latest)
  python train.py --config "$CONFIG" --output-dir "$RUN" "${resume[@]}" --no-progress \
    train.max_minutes="$segment" ${OVERRIDES:-}
  rm -rf "$RUN/model-${minutes}min"
  cp -r "$RUN/model" "$RUN/model-${minutes}min"
  python sample.py --model "$RUN/model-${minutes}min" --prompts-file bench/prompts.txt --seeds 0-3 \
    --no-maps --no-progress --overwrite --out "$RUN/samples-${minutes}min"
  python bench/sample_grid.py "$RUN/samples-${minutes}min" bench/prompts.txt 4 "$RUN/grid-${minutes}min.png"
  previous=$minutes
done
grep -E "step [0-9]+ loss" "$RUN/train.log" | awk '{print $4, $6}' > "$RUN/loss.tsv"
echo "loss curve: $RUN/loss.tsv; grids: $RUN/grid-<minutes>min.png"
