#!/usr/bin/env bash
# What helps most on a dataset of your own in a fixed time budget: train one run per variant for the
# same minutes (the README's "your own data" command plus the variant's overrides), evaluate each with
# the same captions, seeds and judge (a tiny CLIP of the dataset's captions, independent of the UNet's
# text tower, shared by every variant), then print one table. Runs one after another: run it alone,
# since other jobs on the same cores slow training.
#
#   DATA=path/to/images bash bench/real_data_study.sh                 (10 minutes per variant)
#   DATA=path/to/images MINUTES=30 SEEDS=2 VARIANTS="default tuned-text" bash bench/real_data_study.sh
#
# Runs go to outputs/runs/study-<minutes>min-<variant>, evaluations to outputs/eval/ beside them;
# a run folder that exists already is evaluated as it is, not trained again.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATA:?set DATA to a dataset folder or Hub id}"
MINUTES=${MINUTES:-10}
CAPTIONS=${CAPTIONS:-100}
SEEDS=${SEEDS:-1}

overrides() {  # a variant's config overrides
  case $1 in
    default) echo "" ;;
    tuned-text) echo "train.text_encoder_lr=3e-4" ;;  # the tower tuned at the config default's rate (train.text_encoder_lr), as on shapes
    wide) echo "unet.base_channels=64" ;;  # four times the default's width (twice the 4M UNet's of the 2026-12-02 study)
    narrow) echo "unet.base_channels=16 unet.head_dim=16" ;;  # the default since c5b9774 (half the 4M UNet's width): no change now
    64px) echo "data.image_size=64 unet.channel_mults=[1,1,2,4]" ;;  # the default's levels and one more above them
    caption-dropout) echo "train.caption_dropout=0.2" ;;  # twice the default's empty captions, for guidance
    small-batch) echo "train.batch_size=32" ;;  # a quarter of the default's batch: more steps for the same images
    high-lr) echo "train.learning_rate=2e-3" ;;  # twice the default's learning rate: more from each image seen
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

runs=()
for variant in ${VARIANTS:-default tuned-text wide 64px}; do
  run=outputs/runs/study-${MINUTES}min-$variant
  extra=$(overrides "$variant")
  if [ ! -d "$run" ]; then
    # shellcheck disable=SC2086  # the overrides are separate words
    python train.py data.dataset="$DATA" data.test_fraction=0.1 train.text_encoder_lr=0 train.max_minutes="$MINUTES" $extra \
      --output-dir "$run" --no-progress
  fi
  python -m diffusion.evaluation --model "$run" --captions "$CAPTIONS" --seeds "$SEEDS" --no-progress
  runs+=("$run")
done
python bench/real_data_table.py "${runs[@]}"
