#!/usr/bin/env bash
# Does a change leave behaviour alone, bit for bit? Trains configs/tiny.yaml for 12 fixed-seed steps (the
# tuned tower, grounding, the text placer, EMA, a checkpoint, a validation) at commit OLD and in the
# working tree, compares the exported weights, then has each side sample its own export with maps (plain,
# and with layout guidance) and compares every file written: images, maps.npz, manifests.
#
#     bash bench/same_bits.sh OLD_COMMIT            # e.g. bash bench/same_bits.sh HEAD~1
#
# Prints one line per compared file that differs, then "same" or "DIFFERENT". Each side uses its own cache
# (a tiny dataset and tiny CLIP, about a minute); everything goes to a temporary folder, removed at the end.
set -euo pipefail
old=${1:?usage: bash bench/same_bits.sh OLD_COMMIT}
here=$(pwd)
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git worktree add --detach "$work/old" "$old" >/dev/null

run_side() {  # $1: the tree to run, $2: its output folder
  mkdir -p "$2"
  (cd "$1" && PYTHONPATH="$1" python - "$2" <<'EOF'
import inspect, sys
from diffusion.config import load_config
from diffusion.training.loop import train
out = sys.argv[1]
cfg = load_config("configs/tiny.yaml", [f"cache_dir={out}/cache", "train.max_steps=12", "train.checkpoint_every=6",
                                        "train.validate_every=12", "train.log_every=4"])
device = {"device": "cpu"} if "device" in inspect.signature(train).parameters else {}
train(cfg, output_dir=f"{out}/run", progress=False, **device)
EOF
  ) > "$2/train.log" 2>&1
  for guidance in 0 1; do
    (cd "$1" && PYTHONPATH="$1" python sample.py --model "$2/run" --prompt "a red circle left of a blue square" \
      --prompt "a large green triangle" --seeds 0,1 --layout-guidance $guidance --out "$2/samples-$guidance" \
      --device cpu --no-progress) >> "$2/sample.log" 2>&1
  done
}

run_side "$work/old" "$work/out-old"
run_side "$here" "$work/out-new"

status=same
for part in unet/diffusion_pytorch_model.safetensors text_encoder/model.safetensors; do
  PYTHONPATH="$here" python - "$work/out-old/run/model/$part" "$work/out-new/run/model/$part" <<'EOF' || status=DIFFERENT
import sys
import torch
from safetensors.torch import load_file
old, new = (load_file(path) for path in sys.argv[1:])
if old.keys() != new.keys() or not all(torch.equal(old[k], new[k]) for k in old):
    print(f"differs: {sys.argv[2]}")
    sys.exit(1)
EOF
done
for side in samples-0 samples-1; do
  while IFS= read -r file; do
    # A manifest names the model's path, which differs between the two sides: compare it without that.
    if [[ $file == *manifest.json ]]; then
      diff -q <(sed "s#$work/out-old#OUT#g" "$work/out-old/$side/$file") <(sed "s#$work/out-new#OUT#g" "$work/out-new/$side/$file") \
        >/dev/null || { echo "differs: $side/$file"; status=DIFFERENT; }
    else
      cmp -s "$work/out-old/$side/$file" "$work/out-new/$side/$file" || { echo "differs: $side/$file"; status=DIFFERENT; }
    fi
  done < <(cd "$work/out-old/$side" && find . -type f | sort)
done
echo "$status: 12 training steps and $(cd "$work/out-old" && find samples-* -type f | wc -l) sampled files, $old against the working tree"
