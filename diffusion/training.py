"""The training loop: our UNet on a captioned image folder, with Hugging Face accelerate.

Runs as one CPU process, on one GPU, or on several processes (`accelerate launch`). Leaves a run
folder with the resolved config, a log, TensorBoard scalars, resumable checkpoints, validation
grids and, at the end, an exported model (EMA weights) that the sampler loads by path alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel
from PIL import Image

from diffusion import sampler_defaults as defaults
from diffusion.checkpoints import (
    STATE_FILE,
    commit_dir,
    list_checkpoints,
    prune_checkpoints,
    read_state,
    resolve_resume,
    staging_dir,
)
from diffusion.config import Config, ConfigError, save_config
from diffusion.data import CaptionedImageFolder, swap_left_right
from diffusion.errors import UserError
from diffusion.grounding import TokenObjectTable
from diffusion.objective import Grounding, diffusion_loss, make_noise_scheduler
from diffusion.progress import TrainingProgress
from diffusion.prepare import TINY_CLIP, prepare_dataset, prepare_text_encoder
from diffusion.attention_maps import MapSettings
from diffusion.generate import Job, generate
from diffusion.pipeline import TextToImagePipeline
from diffusion.sampling import make_sampling_scheduler
from diffusion.text_cache import CaptionRows, TextStateCache, TunedTextStates
from diffusion.text_encoder import TextEncoder, TextEncoderLoadError, load_error_message
from diffusion.unet import UNet

logger = logging.getLogger("diffusion")


class TrainingError(UserError, RuntimeError):
    """Training cannot start or go on (a taken run folder, too little data, a diverged loss)."""


def build_unet(cfg: Config, context_dim: int) -> UNet:
    """The UNet described by a config; the text encoder fixes the width of its keys and values."""
    try:
        return UNet(sample_size=cfg.data.image_size, context_dim=context_dim, **asdict(cfg.unet))
    except ValueError as error:  # e.g. an attention resolution this UNet does not have
        raise ConfigError(str(error)) from None


def text_width(cfg: Config) -> int:
    """The text encoder's hidden size, read from its config without loading its weights."""
    if cfg.text_encoder.name == TINY_CLIP:
        return cfg.text_encoder.tiny_clip.text_width
    from transformers import CLIPTextConfig

    try:
        return CLIPTextConfig.from_pretrained(cfg.text_encoder.name).hidden_size
    except (OSError, ValueError) as error:
        raise TextEncoderLoadError(load_error_message(cfg.text_encoder.name, error)) from error


def dry_run_report(cfg: Config) -> str:
    """The resolved config as YAML and the size of the UNet it describes."""
    unet = build_unet(cfg, text_width(cfg))
    params = sum(p.numel() for p in unet.parameters())
    layers = ", ".join(f"{name} ({size}x{size})" for name, size in unet.cross_attention_layers.items())
    return (
        yaml.safe_dump(asdict(cfg), sort_keys=False)
        + f"\nUNet parameters: {params:,} ({params / 1e6:.2f}M)\ncross-attention layers: {layers}"
    )


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in ("checkpoints", "model", "config.yaml"))


def choose_run_dir(cfg: Config, output_dir: str | None, resume: str | None) -> Path:
    """`--output-dir`, or outputs/runs/<name>[-N]: a new run never lands in a folder holding one."""
    if output_dir is not None:
        run_dir = Path(output_dir)
        if resume is None and holds_run(run_dir):
            raise TrainingError(
                f"{run_dir} already holds a run. Continue it with --resume latest, or choose another --output-dir."
            )
        return run_dir
    base = Path("outputs/runs") / cfg.name
    if resume is not None:
        return base
    run_dir, n = base, 1
    while holds_run(run_dir):
        n += 1
        run_dir = base.with_name(f"{cfg.name}-{n}")
    return run_dir


def setup_logging(is_main: bool) -> None:
    """Console logging on the main process (warnings only elsewhere); the run's train.log joins later."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)


def log_to_file(run_dir: Path) -> None:
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)  # a previous run in this process
        handler.close()
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)


def resolve_precision(setting: str, on_gpu: bool) -> tuple[str, str]:
    """train.mixed_precision -> (what accelerate gets, why). "auto" takes bf16 only where the hardware
    computes it natively: emulated bf16 on a CPU without AVX-512 is many times slower than fp32."""
    if setting != "auto":
        return setting, "as configured"
    if on_gpu:
        return ("bf16", "the GPU supports bf16") if torch.cuda.is_bf16_supported() else ("fp16", "the GPU lacks bf16")
    capability = torch.backends.cpu.get_cpu_capability()
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bf16", f"this CPU ({capability}) computes bf16 natively"
    return "no", f"this CPU ({capability}) has no native bf16, which would run many times slower than fp32"


def check_can_start(cfg: Config) -> None:
    """What can be checked in seconds, before minutes go into preparing data and a text encoder:
    the dataset folder exists and the config builds a UNet."""
    if cfg.data.dataset != "shapes" and not Path(cfg.data.dataset).is_dir():
        from diffusion.prepare import prepare_dataset

        prepare_dataset(cfg.data, Path(cfg.cache_dir))  # raises its DatasetError, which names the fix
    build_unet(cfg, text_width(cfg))


class BatchOrder:
    """Which dataset rows each process trains on at each micro-step.

    A pure function of (seed, micro-step): every epoch is a fresh seeded permutation, split into
    global batches, and each process takes every `world`-th row of it. Resuming at a micro-step
    therefore continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int, world: int):
        self.global_batch = batch_size * world
        if num_rows < self.global_batch:
            raise TrainingError(
                f"the dataset has {num_rows} usable images, fewer than one batch of {self.global_batch} "
                f"({batch_size} per process x {world}); lower train.batch_size or add images"
            )
        self.num_rows, self.seed, self.rank, self.world = num_rows, seed, rank, world
        self.batches_per_epoch = num_rows // self.global_batch

    def rows(self, micro_step: int) -> torch.Tensor:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        batch = order[index * self.global_batch : (index + 1) * self.global_batch]
        return batch[self.rank :: self.world]


class StopOnInterrupt:
    """Ctrl-C asks the loop to stop after the current step (a second Ctrl-C stops at once)."""

    def __init__(self):
        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        self.flag = True
        self.restore()  # the next Ctrl-C interrupts at once
        print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def requested(self, accelerator: Accelerator) -> bool:
        """True on every process once any process was interrupted (they must checkpoint together)."""
        if accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def image_grid(images: list[Image.Image], columns: int, scale: int = 4) -> Image.Image:
    """Tile equally sized images into one grid, upscaled with nearest neighbours for viewing."""
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid.resize((grid.width * scale, grid.height * scale), Image.NEAREST)


def train(
    cfg: Config, output_dir: str | None = None, resume: str | None = None, progress: bool = True
) -> Path:
    """Train `cfg` and return the run folder (which holds the exported model under model/)."""
    t = cfg.train
    # 1. Checks, accelerator, the run folder's name (decided on the main process and shared).
    check_can_start(cfg)
    precision, precision_reason = resolve_precision(t.mixed_precision, torch.cuda.is_available())
    accelerator = Accelerator(
        # Several processes without a GPU (torchrun, or `accelerate launch --multi_gpu`) train on
        # the CPU over gloo; accelerate only picks that backend when told the device is the CPU.
        cpu="LOCAL_RANK" in os.environ and not torch.cuda.is_available(),
        mixed_precision=precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir="."),
    )
    main = accelerator.is_main_process
    setup_logging(main)
    if output_dir or resume:
        run_dir = choose_run_dir(cfg, output_dir, resume)
    else:
        shared = [choose_run_dir(cfg, None, None) if main else None]
        run_dir = Path(broadcast_object_list(shared)[0])

    # 2. Data and text encoder, prepared once on the main process and cached. The dataset is read
    #    first, so a bad folder fails before minutes are spent training a tiny CLIP on it. Nothing is
    #    written into the run folder until both are ready: a failed start leaves no run in the way.
    cache_dir = Path(cfg.cache_dir)
    with accelerator.main_process_first():
        dataset_dirs = prepare_dataset(cfg.data, cache_dir, progress=progress and main)
    train_dir = dataset_dirs[0]
    grounded = t.grounding_weight > 0
    dataset = CaptionedImageFolder(
        train_dir, cfg.data.image_size, cfg.data.caption_column, cfg.data.skip_bad_rows, cfg.data.hflip,
        progress=progress and main, masks=grounded,
    )
    with accelerator.main_process_first():
        encoder_source = prepare_text_encoder(
            cfg.text_encoder, cfg.data, cache_dir, progress=progress and main, dataset_dirs=dataset_dirs
        )
    encoder = TextEncoder.from_pretrained(encoder_source).to(accelerator.device)
    token_objects = TokenObjectTable(encoder.tokenizer, encoder.max_length) if grounded else None
    captions = list(dataset.captions)
    if cfg.data.hflip:
        captions += [swap_left_right(c) for c in dataset.captions]
    tune_text = t.text_encoder_lr > 0  # fine-tune the text tower with the UNet, or keep it frozen
    if tune_text:
        encoder.model.requires_grad_(True)
    else:
        text_states = TextStateCache(encoder, captions, progress=progress and main)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        log_to_file(run_dir)
        save_config(cfg, run_dir / "config.yaml")
        accelerator.init_trackers(str(run_dir / "tensorboard"))
    accelerator.wait_for_everyone()
    logger.info("run folder: %s (%d process(es), device %s)", run_dir, accelerator.num_processes, accelerator.device)
    logger.info("mixed precision: %s (train.mixed_precision=%s: %s)", precision, t.mixed_precision, precision_reason)
    logger.info("dataset: %d images, %d distinct captions from %s", len(dataset), len(set(captions)), train_dir)

    # 3. Model, EMA, optimizer and learning-rate schedule; identical on every process.
    set_seed(t.seed)
    unet = build_unet(cfg, encoder.hidden_size)
    logger.info("UNet: %.2fM parameters", sum(p.numel() for p in unet.parameters()) / 1e6)
    ema = EMAModel(
        unet.parameters(), decay=t.ema_decay, use_ema_warmup=t.ema_warmup, power=3 / 4,
        model_cls=UNet, model_config=unet.config,
    )
    parameter_groups = [{"params": list(unet.parameters())}]
    text_ema = None
    if tune_text:
        parameter_groups.append({"params": list(encoder.model.parameters()), "lr": t.text_encoder_lr})
        text_ema = EMAModel(encoder.model.parameters(), decay=t.ema_decay, use_ema_warmup=t.ema_warmup, power=3 / 4)
        text_params = sum(p.numel() for p in encoder.model.parameters())
        logger.info("fine-tuning the text encoder (%.2fM parameters) at lr %g", text_params / 1e6, t.text_encoder_lr)
    optimizer = torch.optim.AdamW(
        parameter_groups, lr=t.learning_rate, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay
    )
    if t.lr_schedule == "cosine":
        lr_schedule = get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    else:
        lr_schedule = get_constant_schedule_with_warmup(optimizer, t.warmup_steps)
    if tune_text:
        unet, text_model, optimizer = accelerator.prepare(unet, encoder.model, optimizer)
        text_states = TunedTextStates(encoder, captions, text_model)
        trained_models = (unet, text_model)
        text_ema.to(accelerator.device)
        accelerator.register_for_checkpointing(lr_schedule, ema, text_ema)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)
        accelerator.register_for_checkpointing(lr_schedule, ema)
        trained_models = (unet,)
    ema.to(accelerator.device)
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]
    noise_scheduler = make_noise_scheduler(cfg.noise)

    # 4. Resume, or start from step 0 with a per-process noise stream.
    step = 0
    if resume is not None:
        checkpoint = resolve_resume(run_dir, resume)
        state = read_state(checkpoint)
        if state.get("context_dim", encoder.hidden_size) != encoder.hidden_size:
            raise TrainingError(
                f"{checkpoint} was trained with text states of width {state['context_dim']}, but the text encoder "
                f"{cfg.text_encoder.name!r} gives width {encoder.hidden_size}. Resume with the checkpoint's own "
                f"config: python train.py --config {checkpoint / 'config.yaml'} --output-dir {run_dir} --resume latest"
            )
        try:
            accelerator.load_state(str(checkpoint))
        except (RuntimeError, KeyError, ValueError) as error:
            raise TrainingError(
                f"{checkpoint} does not fit the model this config builds ({str(error).splitlines()[0][:200]}). Resume "
                f"with the checkpoint's own config: python train.py --config {checkpoint / 'config.yaml'} "
                f"--output-dir {run_dir} --resume latest"
            ) from None
        step = state["step"]
        logger.info("resumed from %s at step %d", checkpoint, step)
    else:
        torch.manual_seed(t.seed + 7919 * (accelerator.process_index + 1))
    order = BatchOrder(len(dataset), t.batch_size, t.seed, accelerator.process_index, accelerator.num_processes)

    def save_checkpoint() -> None:
        final = run_dir / "checkpoints" / f"checkpoint-{step:06d}"
        tmp = staging_dir(final) if main else final.parent / f".{final.name}.partial"
        accelerator.wait_for_everyone()  # every process writes its random state into tmp
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if main:
            save_config(cfg, tmp / "config.yaml")
            state = {"step": step, "micro_step": micro_step, "context_dim": encoder.hidden_size}
            (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
            commit_dir(tmp, final)
            prune_checkpoints(run_dir / "checkpoints", t.keep_checkpoints)
        accelerator.wait_for_everyone()

    def with_ema_weights(fn):
        """Call fn(unet) with the EMA weights in the UNet (and in the text tower, when it is tuned)."""
        model = accelerator.unwrap_model(unet)
        averaged = [(ema, model)] + ([(text_ema, encoder.model)] if tune_text else [])
        for average, module in averaged:
            average.store(module.parameters())
            average.copy_to(module.parameters())
        try:
            return fn(model)
        finally:
            for average, module in averaged:
                average.restore(module.parameters())

    def validate() -> None:
        """Sample the validation prompts with the EMA weights; save images, maps and a grid."""
        folder = run_dir / "validation" / f"step_{step:06d}"
        jobs = [Job(prompt, seed=0) for prompt in t.validation_prompts]

        def run(model: UNet) -> list[Path]:
            sampler = make_sampling_scheduler(defaults.SCHEDULER, noise_scheduler.config)
            pipe = TextToImagePipeline(model, sampler, encoder.model, encoder.tokenizer)
            return generate(
                pipe, jobs, folder, batch_size=len(jobs), num_steps=t.validation_steps,
                guidance_scale=t.validation_guidance, maps=MapSettings(), extra_manifest={"training_step": step},
                progress=False,
            )

        paths = with_ema_weights(run)
        grid = image_grid([Image.open(p).convert("RGB") for p in paths], columns=len(paths))
        grid.save(run_dir / "validation" / f"step_{step:06d}.png")
        accelerator.get_tracker("tensorboard").writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")

    # 5. The loop: one optimizer update per `gradient_accumulation_steps` micro-batches.
    accum = t.gradient_accumulation_steps
    micro_step = step * accum
    bar = TrainingProgress(step, t.max_steps, t.max_minutes, enabled=progress and main)
    interrupt = StopOnInterrupt()
    started = time.monotonic()
    window_start, window_images, window_losses, window_grounding = time.monotonic(), 0, [], []
    try:
        while step < t.max_steps:
            rows = order.rows(micro_step)
            batch = dataset.batch(rows)
            images, captions = batch.pixels.to(accelerator.device), batch.captions
            caption_rows = text_states.rows(captions)
            dropped = torch.rand(len(captions)) < t.caption_dropout  # classifier-free guidance: learn the null prompt
            caption_rows[dropped] = CaptionRows.NULL_ROW
            grounding = None
            if token_objects is not None:
                conditioned = ["" if d else c for c, d in zip(captions, dropped.tolist())]  # a dropped caption grounds nothing
                targets = token_objects(conditioned, batch.word_objects).to(accelerator.device)  # (B, T)
                grounding = Grounding(
                    targets, batch.masks.to(accelerator.device), t.grounding_coverage, t.grounding_pure_noise_weight
                )
            with accelerator.accumulate(*trained_models):
                context, context_mask = text_states.lookup(caption_rows, accelerator.device)  # (B, T, D), (B, T)
                terms = diffusion_loss(unet, noise_scheduler, images, context, context_mask, t.min_snr_gamma, grounding)
                loss = terms.diffusion if terms.grounding is None else terms.diffusion + t.grounding_weight * terms.grounding
                if not torch.isfinite(loss):
                    last = list_checkpoints(run_dir / "checkpoints")
                    kept = f"the last good checkpoint is {last[-1][1]}" if last else "no checkpoint was written yet"
                    raise TrainingError(
                        f"the loss became {loss.item()} at step {step}; training stopped and {kept}. "
                        "Lower train.learning_rate, or use mixed_precision: no."
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(trained_parameters, t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            window_images += len(captions) * accelerator.num_processes
            window_losses.append(terms.diffusion.item())
            if terms.grounding is not None:
                window_grounding.append(terms.grounding.item())
            if not accelerator.sync_gradients:
                continue
            lr_schedule.step()
            ema.step(unet.parameters())
            if tune_text:
                text_ema.step(encoder.model.parameters())
            step += 1
            bar.update(step)

            if step % t.log_every == 0 or step == t.max_steps:
                elapsed = time.monotonic() - window_start
                scalars = {
                    "loss": sum(window_losses) / len(window_losses),
                    "learning_rate": lr_schedule.get_last_lr()[0],
                    "images_per_sec": window_images / max(elapsed, 1e-9),
                }
                if window_grounding:
                    scalars["grounding_loss"] = sum(window_grounding) / len(window_grounding)
                accelerator.log(scalars, step=step)
                bar.update(step, scalars["images_per_sec"], scalars["loss"])
                grounding_note = f" grounding {scalars['grounding_loss']:.4f}" if window_grounding else ""
                logger.info(
                    "step %d loss %.4f lr %.2e %.0f img/s%s", step, scalars["loss"], scalars["learning_rate"],
                    scalars["images_per_sec"], grounding_note,
                )
                window_start, window_images, window_losses, window_grounding = time.monotonic(), 0, [], []
            out_of_time = t.max_minutes > 0 and time.monotonic() - started > 60 * t.max_minutes
            if out_of_time:
                logger.info("train.max_minutes=%g reached at step %d", t.max_minutes, step)
            interrupted = interrupt.requested(accelerator)
            if interrupted:
                bar.close()
                save_checkpoint()
                logger.info(
                    "stopped by Ctrl-C at step %d; checkpoint written. Continue with: python train.py --config %s "
                    "--output-dir %s --resume latest", step, run_dir / "config.yaml", run_dir,
                )
                accelerator.end_training()
                return run_dir
            if step % t.checkpoint_every == 0 or step == t.max_steps or out_of_time:
                save_checkpoint()
            if main and t.validate_every > 0 and (step % t.validate_every == 0 or step == t.max_steps or out_of_time):
                validate()
            if out_of_time:
                break
    finally:  # Ctrl-C behaves as usual again, however the loop ended
        interrupt.restore()
    bar.close()

    # 6. Export the EMA weights with everything the sampler needs.
    accelerator.wait_for_everyone()
    checksums = torch.cat([parameter_checksum(model) for model in trained_models])  # (parameters,)
    checksums = accelerator.gather(checksums[None]).cpu()  # (processes, parameters)
    replicas_identical = bool((checksums == checksums[0]).all())
    if not replicas_identical:
        logger.warning("the %d processes ended with different weights", accelerator.num_processes)
    if main:
        export_dir = run_dir / "model"
        tmp = staging_dir(export_dir)
        sampler = make_sampling_scheduler(defaults.SCHEDULER, noise_scheduler.config)  # same schedule, the default sampler
        with_ema_weights(
            lambda model: TextToImagePipeline(model, sampler, encoder.model, encoder.tokenizer).save_pretrained(tmp)
        )
        save_config(cfg, tmp / "config.yaml")
        (tmp / "training_info.json").write_text(
            json.dumps(
                {
                    "step": step,
                    "text_encoder_source": encoder_source,
                    "text_encoder_tuned": tune_text,
                    "processes": accelerator.num_processes,
                    "replicas_identical": replicas_identical,
                },
                indent=1,
            )
            + "\n"
        )
        commit_dir(tmp, export_dir)
        logger.info("exported the EMA model to %s; sample with: python sample.py --model %s --prompt ...", export_dir, run_dir)
    accelerator.wait_for_everyone()  # every process tears the process group down together, after the export
    accelerator.end_training()
    return run_dir


def parameter_checksum(model: torch.nn.Module) -> torch.Tensor:
    """One float64 sum per parameter tensor: equal across processes iff (practically) the weights are."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()])
