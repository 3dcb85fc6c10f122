"""The training loop: our UNet on a captioned image folder, with Hugging Face accelerate.

Runs as one CPU process, on one GPU, or on several processes (`accelerate launch`): prepare, step,
log, checkpoint, validate, stop, export. What each stage needs lives in its own module of
`diffusion.training`: setup (checks, data, precision), run_folder, text_states (frozen or tuned text
tower), objective and grounding (the losses), checkpoints, validation, export.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from diffusion.config import Config, TrainConfig
from diffusion.devices import DeviceError, use_device
from diffusion.model.unet import UNet
from diffusion.runs import CHECKPOINTS_DIR, CONFIG_FILE
from diffusion.training.batches import TrainingBatches
from diffusion.training.checkpoints import list_checkpoints, load_checkpoint, restore_onto_device, save_checkpoint
from diffusion.training.ema import ema_weights
from diffusion.training.export import export_model
from diffusion.training.interrupt import StopOnInterrupt
from diffusion.training.trackers import chosen_trackers
from diffusion.training.objective import LossTerms, Objective
from diffusion.training.progress import LogWindow, TrainingProgress
from diffusion.training.run_folder import open_run_dir, setup_logging, shared_run_dir
from diffusion.training.setup import (
    TrainingData, TrainingError, build_unet, check_can_start, prepare_training_data, resolve_precision, settle_config,
)
from diffusion.training.text_states import FrozenText, TunedText
from diffusion.training.validation import validate

logger = logging.getLogger("diffusion")

# AdamW's second-moment decay: 0.99 rather than 0.999 follows the gradients' scale faster in a short
# run (as EDM2 does); no weight decay: a model trained for minutes has no time to overfit.
ADAM_BETAS = (0.9, 0.99)
WEIGHT_DECAY = 0.0


@dataclass
class Session:
    """What the loop steps: the prepared models and optimizer, their averages, the objective, the batches."""

    accelerator: Accelerator
    unet: torch.nn.Module  # as accelerate prepared it
    text: FrozenText
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel
    averaged: list  # (EMA, module) pairs of everything trained; averaged[0][1] is the UNet itself
    objective: Objective
    trained_models: tuple[torch.nn.Module, ...]
    trained_parameters: list[torch.nn.Parameter]


def train(
    cfg: Config, output_dir: str | None = None, resume: str | None = None, progress: bool = True, device: str = "auto"
) -> Path:
    """Train `cfg` on `device` (auto: the GPU where there is one; cpu; cuda) and return the run folder
    (which holds the exported model under model/)."""
    # 1. Device, checks, accelerator, the run folder's name (decided on the main process and shared).
    chosen = use_device(device)
    if chosen.index is not None:
        raise DeviceError(f"--device {device}: choose the GPU with CUDA_VISIBLE_DEVICES={chosen.index} and --device cuda")
    trackers = chosen_trackers(cfg.train.report_to)
    check_can_start(cfg, chosen)
    precision, why = resolve_precision(cfg.train.mixed_precision, chosen)
    accelerator = Accelerator(
        # On the CPU by choice, or for want of a GPU: several processes (torchrun, `accelerate launch
        # --multi_gpu`) then train over gloo, the backend accelerate takes when told the device is the CPU.
        cpu=chosen.type == "cpu",
        mixed_precision=precision, gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        log_with=trackers or None, project_config=ProjectConfiguration(project_dir="."),
    )
    main = accelerator.is_main_process
    setup_logging(main)
    run_dir = shared_run_dir(cfg, output_dir, resume, accelerator)

    # 2. Data and text encoder (cached after first use), the config as this run trains it, then the run
    # folder: a failed start leaves none.
    data = prepare_training_data(cfg, accelerator, progress and main)
    t = cfg.train
    if t.text_encoder_lr > 0:
        text = TunedText(data.encoder, data.captions, t.text_encoder_lr, t.ema_decay)
    else:
        text = FrozenText(data.encoder, data.captions, progress and main)
    cfg, notes = settle_config(cfg, data)
    t = cfg.train
    open_run_dir(run_dir, cfg, accelerator)
    logger.info("run folder: %s (%d process(es), device %s)", run_dir, accelerator.num_processes, accelerator.device)
    logger.info("mixed precision: %s (train.mixed_precision=%s: %s)", precision, t.mixed_precision, why)
    logger.info("dataset: %d images, %d distinct captions from %s (%s)", len(data.dataset), len(set(data.captions)),
                data.train_dir, data.dataset.storage)
    for note in notes:
        logger.info(note)

    # 3. Model, averages, optimizer, schedule and objective; then resume, or start from step 0.
    session = start_session(cfg, data, text, accelerator)
    step = 0
    if resume is not None:
        averages = [average for average, _ in session.averaged]
        state = load_checkpoint(accelerator, run_dir, resume, cfg, data.encoder.width, averages)
        step = state["step"]
        logger.info("resumed from %s at step %d", state["checkpoint"], step)
    else:
        torch.manual_seed(t.seed + 7919 * (accelerator.process_index + 1))  # a noise stream per process
    batches = TrainingBatches(data.dataset, text.states, data.token_objects, t, accelerator.device,
                              accelerator.process_index, accelerator.num_processes)

    # 4. The loop, then the export of the EMA weights with everything the sampler needs.
    started, first_step = time.monotonic(), step
    step, stopped = run_steps(session, batches, cfg, run_dir, data, step, progress and main)
    if not stopped:
        record = {"minutes": round((time.monotonic() - started) / 60, 2), "mixed_precision": precision,
                  "resumed_from_step": first_step}
        export(session, cfg, run_dir, data, step, record)
    accelerator.end_training()
    return run_dir


def start_session(cfg: Config, data: TrainingData, text: FrozenText, accelerator: Accelerator) -> Session:
    """The UNet, its EMA, the optimizer and learning-rate schedule, prepared by accelerate; identical on every process."""
    t = cfg.train
    set_seed(t.seed)
    unet = build_unet(cfg, data.encoder.width)
    logger.info("UNet: %.2fM parameters; %s", sum(p.numel() for p in unet.parameters()) / 1e6, text.describe())
    ema = EMAModel(
        unet.parameters(), decay=t.ema_decay, use_ema_warmup=True, power=3 / 4, foreach=True,  # warmup: 1 - (1 + step)^-3/4
        model_cls=UNet, model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(
        [{"params": list(unet.parameters())}, *text.parameter_groups()],
        lr=t.learning_rate, betas=ADAM_BETAS, weight_decay=WEIGHT_DECAY,
        fused=accelerator.device.type == "cuda",  # one kernel per step for all parameters (the CPU keeps foreach)
    )
    lr_schedule = make_lr_schedule(optimizer, t)
    prepared, *text_modules, optimizer = accelerator.prepare(unet, *text.to_prepare(), optimizer)
    text.prepared(tuple(text_modules), accelerator)
    accelerator.register_for_checkpointing(lr_schedule, ema, *text.checkpointed)
    model = accelerator.unwrap_model(prepared)
    averaged = [(ema, model), *text.averages]  # the EMA weights of what is trained
    restore_onto_device([average for average, _ in averaged], accelerator.device)
    return Session(
        accelerator, prepared, text, optimizer, lr_schedule, ema, averaged,
        objective=Objective(t, model, accelerator.autocast),  # the conditioning computes in the forward's precision
        trained_models=(prepared, *text.trained),
        trained_parameters=[p for group in optimizer.param_groups for p in group["params"]],
    )


def run_steps(
    s: Session, batches: TrainingBatches, cfg: Config, run_dir: Path, data: TrainingData, step: int, progress: bool
) -> tuple[int, bool]:
    """Step until max_steps, max_minutes or Ctrl-C: one optimizer update per `gradient_accumulation_steps`
    micro-batches. Returns the last step and whether Ctrl-C stopped the run (its checkpoint is written)."""
    t, accelerator = cfg.train, s.accelerator
    micro_step = step * t.gradient_accumulation_steps
    bar = TrainingProgress(step, t.max_steps, t.max_minutes, enabled=progress)
    started, window, logged_at = time.monotonic(), LogWindow(), step
    with StopOnInterrupt() as interrupt:
        while step < t.max_steps:
            images, caption_rows, grounding = batches(micro_step)  # on the device, as every table they come from
            with accelerator.accumulate(*s.trained_models):
                states, mask = s.text.states.lookup(caption_rows)  # (B, T, D), (B, T)
                terms = s.objective(s.unet, images, states, mask, grounding)
                accelerator.backward(terms.total)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(s.trained_parameters, t.grad_clip)
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            window.add(len(images) * accelerator.num_processes, logged_terms(terms))  # kept on the device
            if not accelerator.sync_gradients:
                continue
            s.lr_schedule.step()
            s.ema.step(s.unet.parameters())
            s.text.ema_step()
            step += 1
            bar.update(step)

            # The host reads the device only at log lines, checkpoints and validations, not every step.
            out_of_time = t.max_minutes > 0 and time.monotonic() - started > 60 * t.max_minutes
            stop = interrupt.requested(accelerator, every=t.log_every, step=step)
            log_due = step % t.log_every == 0 or step == t.max_steps
            checkpoint_due = step % t.checkpoint_every == 0 or step == t.max_steps or out_of_time or stop
            validate_due = (accelerator.is_main_process and t.validate_every > 0 and not stop
                            and (step % t.validate_every == 0 or step == t.max_steps or out_of_time))
            if log_due or checkpoint_due or validate_due:
                means = window.means()
                if not all(math.isfinite(value) for value in means.values()):
                    raise diverged(means, logged_at, step, run_dir)  # before a checkpoint could keep the broken weights
            if log_due:
                scalars = window.scalars(means, s.lr_schedule.get_last_lr()[0])
                accelerator.log(scalars, step=step)
                bar.update(step, scalars["images_per_sec"], scalars["loss"])
                logger.info(LogWindow.line(step, scalars))
                window, logged_at = LogWindow(), step
            if out_of_time:
                logger.info("train.max_minutes=%g reached at step %d", t.max_minutes, step)
            if stop:
                bar.close()
            if checkpoint_due:
                state = {"step": step, "micro_step": micro_step, "context_dim": data.encoder.width}
                save_checkpoint(accelerator, run_dir, cfg, state)
            if stop:
                logger.info(
                    "stopped by Ctrl-C at step %d; checkpoint written. Continue with: python train.py --config %s "
                    "--output-dir %s --resume latest", step, run_dir / CONFIG_FILE, run_dir,
                )
                return step, True
            if validate_due:
                with ema_weights(s.averaged):
                    validate(run_dir, step, s.averaged[0][1], data.encoder, s.objective.scheduler.config, t, accelerator)
            if out_of_time:
                break
    bar.close()
    return step, False


def export(s: Session, cfg: Config, run_dir: Path, data: TrainingData, step: int, record: dict) -> None:
    """Write run_dir/model from the EMA weights (main process), after checking that every process holds the same;
    `record`: what the run adds to training_info.json (its minutes, precision, first step)."""
    accelerator = s.accelerator
    accelerator.wait_for_everyone()
    checksums = torch.cat([parameter_checksum(model) for model in s.trained_models])  # (parameters,)
    checksums = accelerator.gather(checksums[None]).cpu()  # (processes, parameters)
    replicas_identical = bool((checksums == checksums[0]).all())
    if not replicas_identical:
        logger.warning("the %d processes ended with different weights", accelerator.num_processes)
    if accelerator.is_main_process:
        info = {
            "step": step, "train_dir": str(data.train_dir), "images": len(data.dataset), "text_encoder_source": data.encoder_source,
            "text_encoder_tuned": s.text.tuned, "processes": accelerator.num_processes, "replicas_identical": replicas_identical,
            "device": accelerator.device.type, "unet_parameters": sum(p.numel() for p in s.averaged[0][1].parameters()), **record,
        }
        with ema_weights(s.averaged):
            export_dir = export_model(run_dir, cfg, s.averaged[0][1], data.encoder, s.objective.scheduler.config, info)
        logger.info("exported the EMA model to %s; sample with: python sample.py --model %s --prompt ...", export_dir, run_dir)
    accelerator.wait_for_everyone()  # every process tears the process group down together, after the export


def make_lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig):
    if t.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, t.warmup_steps, t.max_steps)
    return get_constant_schedule_with_warmup(optimizer, t.warmup_steps)


def logged_terms(terms: LossTerms) -> dict[str, torch.Tensor]:
    """The loss terms a log line shows, by their scalar names: the diffusion loss and, where trained, the others."""
    named = {"loss": terms.diffusion, "grounding_loss": terms.grounding, "place_loss": terms.place}
    return {name: value for name, value in named.items() if value is not None}


def diverged(means: dict[str, float], logged_at: int, step: int, run_dir: Path) -> TrainingError:
    """The error of a loss that became non-finite after step `logged_at`, at step `step` at the latest."""
    bad = ", ".join(f"{name} {value}" for name, value in means.items() if not math.isfinite(value))
    last = list_checkpoints(run_dir / CHECKPOINTS_DIR)
    if last:
        kept = (f"the last good checkpoint is {last[-1][1]} (this folder keeps it and the run's train.log). To start again, "
                "use another --output-dir")
    else:
        kept = (f"no checkpoint was written, so nothing of this run is worth keeping but its train.log. To start again, "
                f"remove {run_dir} or use another --output-dir")
    return TrainingError(
        f"the loss became non-finite ({bad}) between steps {logged_at + 1} and {step}; training stopped and {kept}, "
        "with a lower train.learning_rate or train.mixed_precision: no."
    )


def parameter_checksum(model: torch.nn.Module) -> torch.Tensor:
    """One float64 sum per parameter tensor: equal across processes iff (practically) the weights are."""
    return torch.stack([p.detach().double().sum() for p in model.parameters()])
