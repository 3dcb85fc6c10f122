"""Time the training step of a config's UNet on one device, without and with torch.compile of its blocks.

The step is the one `train.py` runs, on a synthetic batch of the config's size: the diffusion loss,
plus the grounding and place losses when train.grounding_weight > 0 (random masks of 1-3 objects,
caption tokens pointing at them), weighted as cfg.train weights them; AdamW (fused on CUDA), gradient
clipping, autocast in the precision training resolves. The text tower is left out: its states are
random (its cost when tuned is step_cost.py's "tuned" row). "compiled" is a copy of the same weights
whose UNet blocks (`unet.down`, `unet.mid`, `unet.up`) are each compiled in place with
`module.compile()`, so its state dict keeps its names. Rounds alternate the variants so machine
noise hits both alike; the figures are medians over rounds. FLOPs are counted once, over one
forward + backward, by torch's FlopCounterMode: matmuls, convolutions and attention only.

    python bench/gpu_step.py [--config configs/gpu.yaml] [--device cuda] [--steps 20] [--rounds 5]
                             [--warmup 5] [--compile both|blocks|none] [--peak-tflops 989] [--json step.json]
                             [overrides such as train.batch_size=64]
    python bench/gpu_step.py --config configs/tiny.yaml --device cpu --steps 2 --rounds 2 --warmup 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch._dynamo
from torch.utils.flop_counter import FlopCounterMode

from diffusion.config import Config, load_config
from diffusion.devices import DEVICE_HELP, use_device
from diffusion.model.unet import UNetBlock
from diffusion.training.loop import ADAM_BETAS, WEIGHT_DECAY
from diffusion.training.objective import Grounding, Objective
from diffusion.training.prepare import TINY_CLIP
from diffusion.training.setup import build_unet, resolve_precision, text_width

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (NVIDIA's datasheets, without sparsity); TF32 is half.
# Checked in order: the first name found in torch.cuda.get_device_name() wins.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}
REAL_TOKENS = 10  # tokens of a short shapes caption, <|startoftext|> and <|endoftext|> included
CLIP_MAX_LENGTH = 77  # a Hub CLIP's context length


class Batch(NamedTuple):
    images: torch.Tensor  # (B, 3, S, S) in [-1, 1]
    context: torch.Tensor  # (B, T, D) text states
    context_mask: torch.Tensor  # (B, T) True for real tokens
    grounding: Grounding | None


@dataclass
class Variant:
    name: str
    step: Callable[[], None]  # one training step
    warmup_s: float  # wall time of the warm-up steps (compilation included)
    memory: int | None  # peak bytes of its weights, gradients, optimizer state and activations (CUDA only)
    times: list[float] = field(default_factory=list)  # seconds per step, one per round


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/gpu.yaml")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per variant (compilation happens here)")
    parser.add_argument("--compile", choices=["none", "blocks", "both"], default="both",
                        help="none: plain only; blocks: compiled blocks only; both: the two, alternated (default)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak in the step's precision (default: on an H100/H200, 989 under bf16/fp16, "
                        "half that for TF32; else none, and no share is printed)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="config overrides, as train.py takes them: train.batch_size=64")
    return parser.parse_args()


def synthetic_batch(cfg: Config, device: torch.device) -> Batch:
    """A batch shaped like the training loop's: images, text states and (with grounding) object masks."""
    g = torch.Generator().manual_seed(0)
    b, size = cfg.train.batch_size, cfg.data.image_size
    tokens = cfg.text_encoder.tiny_clip.max_length if cfg.text_encoder.name == TINY_CLIP else CLIP_MAX_LENGTH
    images = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    context = torch.randn(b, tokens, text_width(cfg), generator=g)  # (B, T, D); (B, T, 2D) with a placer
    context_mask = torch.arange(tokens)[None, :].expand(b, tokens) < REAL_TOKENS  # (B, T)
    grounding = None
    if cfg.train.grounding_weight > 0:
        objects = cfg.data.shapes.max_objects  # ids 1..objects; 0 is the background
        masks = torch.zeros(b, size, size, dtype=torch.long)  # (B, S, S) object id per pixel, 0: background
        token_objects = torch.zeros(b, tokens, dtype=torch.long)  # (B, T) object id per token, 0: none
        for i in range(b):
            for k in range(1, int(torch.randint(1, min(objects, 3) + 1, (1,), generator=g)) + 1):
                side = int(torch.randint(size // 4, size // 2 + 1, (1,), generator=g))
                x, y = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
                masks[i, y : y + side, x : x + side] = k  # a square object; later ones may cover earlier ones
                token_objects[i, 3 * k - 2 : 3 * k] = k  # "a <colour> <shape>": two words per object
        grounding = Grounding(token_objects=token_objects.to(device), masks=masks.to(device), num_objects=objects + 1)
    return Batch(images.to(device), context.to(device), context_mask.to(device), grounding)


def training_loss(objective: Objective, model: torch.nn.Module, batch: Batch, autocast) -> torch.Tensor:
    """The loss the training loop minimises: diffusion + grounding_weight * grounding + place_weight * place."""
    with autocast():
        return objective(model, batch.images, batch.context, batch.context_mask, batch.grounding).total


def make_step(model: torch.nn.Module, cfg: Config, device: torch.device, loss_fn: Callable, fp16: bool) -> Callable[[], None]:
    """One optimizer update, as the loop does it; nothing in it waits for the device."""
    t = cfg.train
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=ADAM_BETAS,
                                  weight_decay=WEIGHT_DECAY, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)  # what accelerate adds under fp16; a no-op otherwise

    def step() -> None:
        loss = loss_fn(model)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if t.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        scaler.step(optimizer)
        scaler.update()

    return step


def compile_blocks(model: torch.nn.Module) -> None:
    """Compile every UNetBlock in place (its names and state-dict keys stay as they are)."""
    blocks = [m for m in model.modules() if isinstance(m, UNetBlock)]
    # All blocks share one code object, and each takes its own cache entry there (its widths, and the
    # grounding loss's per-layer state, differ); past the limit, dynamo would run the rest eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
    for block in blocks:
        # Static shapes: a training run never changes them. Left dynamic, dynamo turns sizes symbolic at
        # the second block's new width, and the grounding loss's math.isqrt(hw) then breaks every graph.
        block.compile(dynamic=False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_variant(name: str, base: torch.nn.Module, cfg: Config, device: torch.device, loss_fn, fp16: bool, warmup: int) -> Variant:
    """A copy of `base` on the device, compiled if asked, warmed up; its peak memory measured meanwhile."""
    on_cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if on_cuda else 0  # the batch and the other variants
    model = copy.deepcopy(base).to(device)
    if name == "compiled":
        compile_blocks(model)
    step = make_step(model, cfg, device, loss_fn, fp16)
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    for _ in range(max(warmup, 1)):  # at least one: compilation must not land in a timed round
        step()
    sync(device)
    memory = torch.cuda.max_memory_allocated(device) - before if on_cuda else None
    return Variant(name, step, time.perf_counter() - start, memory)


def count_flops(model: torch.nn.Module, loss_fn) -> int:
    """FLOPs of one forward + backward of the training loss (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed_round(variant: Variant, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps, the device drained before and after."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        variant.step()
    sync(device)
    return (time.perf_counter() - start) / steps


def compile_failed(error: Exception) -> str:
    """Say why torch.compile failed (the first line of its error) and clear its caches."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    print(f"torch.compile failed, plain figures only: {text}")
    torch._dynamo.reset()
    return text


def time_rounds(variants: dict[str, Variant], rounds: int, steps: int, device: torch.device) -> str | None:
    """Time every variant once per round, rotating the order so neither always runs first. A compiled
    variant that fails (a recompilation, say) is dropped; the error is returned."""
    error = None
    for round_index in range(rounds):
        order = list(variants)
        if not order:
            break
        shift = round_index % len(order)
        for name in order[shift:] + order[:shift]:
            try:
                variants[name].times.append(timed_round(variants[name], steps, device))
            except Exception as failure:
                if name != "compiled":
                    raise
                error = compile_failed(failure)
                del variants[name]
    return error


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def default_peak(device: torch.device, precision: str) -> float | None:
    """The dense peak of a known GPU in the step's precision (TF32 when not mixed), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((value for key, value in PEAK_TFLOPS.items() if key in name), None)
    return None if peak is None else peak if precision in ("bf16", "fp16") else peak / 2


def header(cfg: Config, device: torch.device, precision: str, why: str, params: int, flops: int) -> dict:
    info = {
        "device": device_name(device), "torch": torch.__version__, "config": cfg.name, "precision": precision,
        "batch_size": cfg.train.batch_size, "image_size": cfg.data.image_size, "unet_params": params,
        "grounding": cfg.train.grounding_weight > 0, "text_placer": cfg.unet.text_place_layers > 0, "flops_per_step": flops,
    }
    print(f"device: {info['device']}; torch {torch.__version__}; precision {precision} ({why})")
    print(f"config {cfg.name}: batch {cfg.train.batch_size} x {cfg.data.image_size}px, UNet {params / 1e6:.2f}M parameters, "
          f"grounding {'on' if info['grounding'] else 'off'}, text placer {'on' if info['text_placer'] else 'off'}")
    print(f"FLOPs per step: {flops / 1e9:.1f} GFLOP (forward + backward; matmuls, convolutions and attention only)")
    return info


def report(variants: dict[str, Variant], flops: int, batch_size: int, peak: float | None) -> dict:
    """Print one line per variant and the compiled/plain ratio; return the same figures."""
    figures = {}
    for name, v in variants.items():
        median = statistics.median(v.times)
        tflops = flops / median / 1e12
        share = f", {100 * tflops / peak:.1f}% of {peak:g}" if peak else ""
        memory = "n/a" if v.memory is None else f"{v.memory / 2**30:.2f} GiB"
        print(f"{name:9s} {median * 1000:8.1f} ms/step  {batch_size / median:8.0f} img/s  {tflops:7.3g} TFLOP/s{share}  "
              f"peak memory {memory}  (warm-up {v.warmup_s:.1f} s)")
        figures[name] = {"ms_per_step": median * 1000, "images_per_s": batch_size / median, "tflops": tflops,
                         "peak_share": tflops / peak if peak else None, "peak_memory_bytes": v.memory,
                         "warmup_s": v.warmup_s, "round_ms": [t * 1000 for t in v.times]}
    if len(variants) == 2:
        ratios = [c / p for c, p in zip(variants["compiled"].times, variants["plain"].times)]
        figures["compiled_over_plain"] = statistics.median(ratios)
        print(f"compiled / plain step time: median ratio {figures['compiled_over_plain']:.3f} over {len(ratios)} rounds")
    return figures


def main() -> None:
    args = parse_args()
    device = use_device(args.device)  # on CUDA also TF32 matmuls and cuDNN's autotuned convolutions, as training
    torch.manual_seed(0)
    cfg = load_config(args.config, args.overrides)
    if cfg.train.grounding_weight == 0:
        cfg.unet.text_place_layers = 0  # training drops the placer without grounding targets (diffusion/training/loop.py)
    precision, why = resolve_precision(cfg.train.mixed_precision, device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    batch = synthetic_batch(cfg, device)
    autocast = lambda: torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)  # noqa: E731
    objectives: dict[int, Objective] = {}  # one per model trained: its placer and pooled text condition the text

    def loss_fn(model: torch.nn.Module) -> torch.Tensor:
        objective = objectives.get(id(model)) or objectives.setdefault(id(model), Objective(cfg.train, model))
        return training_loss(objective, model, batch, autocast)

    base = build_unet(cfg, text_width(cfg))  # on the CPU; each variant trains its own copy on the device
    flops = count_flops(base.to(device), loss_fn)
    base.to("cpu")
    info = header(cfg, device, precision, why, sum(p.numel() for p in base.parameters()), flops)

    names = {"none": ["plain"], "blocks": ["compiled"], "both": ["plain", "compiled"]}[args.compile]
    variants, compile_error = {}, None
    for name in names:
        try:
            variants[name] = build_variant(name, base, cfg, device, loss_fn, precision == "fp16", args.warmup)
        except Exception as error:  # no compiler, an unsupported op: report it, keep the plain figures
            if name != "compiled":
                raise
            compile_error = compile_failed(error)
    if not variants:  # --compile blocks, and compilation failed
        return
    compile_error = time_rounds(variants, args.rounds, args.steps, device) or compile_error

    peak = args.peak_tflops or default_peak(device, precision)
    figures = report(variants, flops, cfg.train.batch_size, peak)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {**info, "peak_tflops": peak, "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
                  "compile_error": compile_error, **figures}
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
