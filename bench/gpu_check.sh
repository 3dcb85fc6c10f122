#!/usr/bin/env bash
# One GPU, as the user trains: what a user with one GPU gets, checked in one go. Planned at ~8 min on one
# H100 (not yet measured), plus, on a fresh machine, a few minutes to build gpu.yaml's 100,000 shapes and
# tiny CLIP on the CPU (cached under outputs/cache for later runs).
#   install      as the README says (skipped with --no-install)
#   environment  torch, CUDA and the GPU it sees (stops here without one, unless --cpu-smoke)
#   smoke        the CUDA smoke tests (tests/test_cuda.py; they skip, saying so, without CUDA)
#   step         the training step on the GPU, plain and with torch.compile of the UNet blocks:
#                ms/step, img/s, TFLOP/s and share of the peak, peak memory (bench/gpu_step.py)
#   prepare      the dataset and tiny CLIP of the config (cached; not counted in the training minutes)
#   train        configs/gpu.yaml for --minutes through `accelerate launch`, as the README's GPU command
#   evaluate     that run on the GPU: prompt fidelity and attention localisation (results.md)
# Everything lands under --out: <stage>.log per stage, step.json, run/ (train.log, model/), eval/.
#
#   bash bench/gpu_check.sh                              # on a GPU machine
#   bash bench/gpu_check.sh --cpu-smoke --no-install     # here, on the CPU: every stage shrunk, ~2-3 min
# Options: --minutes N (training time, default 3), --out DIR (default outputs/gpu_check; must not hold
# a run already), --no-install, --cpu-smoke (configs/tiny.yaml on the CPU, a few steps of everything).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$ROOT/outputs/gpu_check
MINUTES=3
INSTALL=1
SMOKE=0
while [ $# -gt 0 ]; do
  case $1 in
    --cpu-smoke) SMOKE=1 ;;
    --no-install) INSTALL=0 ;;
    --out) OUT=$(realpath -m "${2:?--out needs a folder}"); shift ;;
    --minutes) MINUTES=${2:?--minutes needs a number}; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "unknown option $1; see the top of $0" >&2; exit 2 ;;
  esac
  shift
done

if [ "$SMOKE" = 1 ]; then  # the same stages at toy sizes: checks the plumbing, not the figures
  CONFIG=configs/tiny.yaml DEVICE=cpu
  # torch.compile of the blocks takes minutes on 2 cores; the GPU run times it.
  STEP_ARGS=(--steps 2 --rounds 2 --warmup 1 --compile none)
  TRAIN_ARGS=(train.max_steps=10 train.validate_every=10 train.checkpoint_every=10)
  EVAL_ARGS=(--quick --seeds 1 --steps 5)
else
  CONFIG=configs/gpu.yaml DEVICE=cuda
  STEP_ARGS=()
  # Stop by time; a validation and a checkpoint every 1,000 steps, so their cost shows in the img/s.
  TRAIN_ARGS=("train.max_minutes=$MINUTES" train.validate_every=1000 train.checkpoint_every=1000)
  EVAL_ARGS=(--seeds 2)
fi

if [ -e "$OUT/run" ]; then
  echo "$OUT already holds a run ($OUT/run): choose another folder with --out DIR, or delete that one" >&2
  exit 1
fi
mkdir -p "$OUT"
cd "$ROOT"

stage() {  # stage NAME COMMAND...: run it, tee its output to $OUT/NAME.log, say its wall time
  local name=$1 start=$SECONDS
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"  # pipefail: a failing command stops the script here
  echo "=== $name: $((SECONDS - start)) s"
}

environment() {
  python -c 'import torch; print("torch", torch.__version__, "| CUDA", torch.version.cuda,
    "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  if [ "$DEVICE" = cuda ] && ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    echo "torch sees no CUDA device: run this on a GPU machine, or add --cpu-smoke to check the plumbing on the CPU"
    return 1
  fi
}

train() {
  # The launcher's --mixed_precision no does not override ours: Accelerator(mixed_precision=...) in
  # diffusion/training/loop.py wins over the ACCELERATE_MIXED_PRECISION the launcher sets (accelerate/state.py).
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train.py --config "$CONFIG" --output-dir "$OUT/run" --no-progress --device "$DEVICE" "${TRAIN_ARGS[@]}"
  echo "--- tail of $OUT/run/train.log"
  tail -n 15 "$OUT/run/train.log"
}

evaluate() {
  python -m diffusion.evaluation --model "$OUT/run" --device "$DEVICE" --out "$OUT/eval" --no-progress "${EVAL_ARGS[@]}"
  echo "--- $OUT/eval/results.md"
  cat "$OUT/eval/results.md"
}

started=$SECONDS
if [ "$INSTALL" = 1 ]; then
  stage install python -m pip install -q torch==2.13.0 -e ".[dev]"
fi
stage environment environment
stage smoke python -m pytest -q -rs tests/test_cuda.py
stage step python bench/gpu_step.py --config "$CONFIG" --device "$DEVICE" --json "$OUT/step.json" "${STEP_ARGS[@]}"
stage prepare python train.py --config "$CONFIG" --prepare-only --no-progress
stage train train
stage evaluate evaluate
echo "=== all stages: $((SECONDS - started)) s; logs, step.json, run/ and eval/ in $OUT"
