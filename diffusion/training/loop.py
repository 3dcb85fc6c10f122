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
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup
from diffusers.training_utils import EMAModel

from diffusion.config import Config, TrainConfig
from diffusion.devices import DeviceError, use_device
from diffusion.model.unet import UNet
from diffusion.training.batches import TrainingBatches
from diffusion.training.checkpoints import list_checkpoints, load_checkpoint, restore_onto_device, save_checkpoint
from diffusion.training.ema import ema_weights
from diffusion.training.export import export_model
from diffusion.training.interrupt import StopOnInterrupt
from diffusion.training.objective import LossTerms, diffusion_loss, make_noise_scheduler
from diffusion.training.progress import LogWindow, TrainingProgress
from diffusion.training.run_folder import open_run_dir, setup_logging, shared_run_dir
from diffusion.training.setup import TrainingError, build_unet, check_can_start, prepare_training_data, resolve_precision
from diffusion.training.text_states import FrozenText, TunedText
from diffusion.training.validation import own_validation_prompts, validate

logger = logging.getLogger("diffusion")


def train(
    cfg: Config, output_dir: str | None = None, resume: str | None = None, progress: bool = True, device: str = "auto"
) -> Path:
    """Train `cfg` on `device` (auto: the GPU where there is one; cpu; cuda) and return the run folder
    (which holds the exported model under model/)."""
    t = cfg.train
    # 1. Device, checks, accelerator, the run folder's name (decided on the main process and shared).
    chosen = use_device(device)
    if chosen.index is not None:
        raise DeviceError(f"--device {device}: choose the GPU with CUDA_VISIBLE_DEVICES={chosen.index} and --device cuda")
    check_can_start(cfg, chosen)
    precision, why = resolve_precision(t.mixed_precision, chosen)
    accelerator = Accelerator(
        # On the CPU by choice, or for want of a GPU: several processes (torchrun, `accelerate launch
        # --multi_gpu`) then train over gloo, the backend accelerate takes when told the device is the CPU.
        cpu=chosen.type == "cpu",
        mixed_precision=precision, gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir="."),
    )
    main = accelerator.is_main_process
    setup_logging(main)
    run_dir = shared_run_dir(cfg, output_dir, resume, accelerator)

    # 2. Data and text encoder (cached after first use), then the run folder: a failed start leaves none.
    data = prepare_training_data(cfg, accelerator, progress and main)
    if t.text_encoder_lr > 0:
        text = TunedText(data.encoder, data.captions, t.text_encoder_lr, t.ema_decay, t.ema_warmup)
    else:
        text = FrozenText(data.encoder, data.captions, progress and main)
    own_prompts = own_validation_prompts(cfg, data.dataset.captions)
    if own_prompts is not None:
        t.validation_prompts = own_prompts  # saved with the config, so the run records what it sampled
    without_placer = data.token_objects is None and cfg.unet.text_place_layers > 0
    if without_placer:
        cfg.unet.text_place_layers = 0  # saved with the config: the model is built and rebuilt without one
    open_run_dir(run_dir, cfg, accelerator)
    logger.info("run folder: %s (%d process(es), device %s)", run_dir, accelerator.num_processes, accelerator.device)
    logger.info("mixed precision: %s (train.mixed_precision=%s: %s)", precision, t.mixed_precision, why)
    logger.info("dataset: %d images, %d distinct captions from %s (%s)", len(data.dataset), len(set(data.captions)),
                data.train_dir, data.dataset.storage)
    if own_prompts is not None:
        logger.info("validation prompts: %s (six of the dataset's own captions; set train.validation_prompts to choose)", own_prompts)
    if without_placer:
        logger.info("training without the text placer: it learns where objects go from their masks (train.grounding_weight > 0 and a dataset with masks)")
    if t.grounding_weight > 0 and data.token_objects is None:
        logger.info("no row of the dataset has mask_file and word_objects: training without the grounding loss")

    # 3. Model, EMA, optimizer and learning-rate schedule; identical on every process.
    set_seed(t.seed)
    unet = build_unet(cfg, data.encoder.width)
    logger.info("UNet: %.2fM parameters; %s", sum(p.numel() for p in unet.parameters()) / 1e6, text.describe())
    ema = EMAModel(
        unet.parameters(), decay=t.ema_decay, use_ema_warmup=t.ema_warmup, power=3 / 4, foreach=True,
        model_cls=UNet, model_config=unet.config,
    )
    optimizer = torch.optim.AdamW(
        [{"params": list(unet.parameters())}, *text.parameter_groups()],
        lr=t.learning_rate, betas=(0.9, t.adam_beta2), weight_decay=t.weight_decay,
        fused=accelerator.device.type == "cuda",  # one kernel per step for all parameters (the CPU keeps foreach)
    )
    lr_schedule = make_lr_schedule(optimizer, t)
    unet, *text_modules, optimizer = accelerator.prepare(unet, *text.to_prepare(), optimizer)
    text.prepared(tuple(text_modules), accelerator)
    accelerator.register_for_checkpointing(lr_schedule, ema, *text.checkpointed)
    trained_models = (unet, *text.trained)
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]
    noise_scheduler = make_noise_scheduler(cfg.noise)
    averaged = [(ema, accelerator.unwrap_model(unet)), *text.averages]  # the EMA weights of what is trained
    averages = [average for average, _ in averaged]
    restore_onto_device(averages, accelerator.device)

    # 4. Resume, or start from step 0 with a per-process noise stream.
    step = 0
    if resume is not None:
        state = load_checkpoint(accelerator, run_dir, resume, cfg, data.encoder.width, averages)
        step = state["step"]
        logger.info("resumed from %s at step %d", state["checkpoint"], step)
    else:
        torch.manual_seed(t.seed + 7919 * (accelerator.process_index + 1))
    batches = TrainingBatches(data.dataset, text.states, data.token_objects, t, accelerator.device,
                              accelerator.process_index, accelerator.num_processes)

    def checkpoint() -> None:
        state = {"step": step, "micro_step": micro_step, "context_dim": data.encoder.width}
        save_checkpoint(accelerator, run_dir, cfg, state)

    # 5. The loop: one optimizer update per `gradient_accumulation_steps` micro-batches.
    micro_step = step * t.gradient_accumulation_steps
    bar = TrainingProgress(step, t.max_steps, t.max_minutes, enabled=progress and main)
    started, window, logged_at = time.monotonic(), LogWindow(), step
    with StopOnInterrupt() as interrupt:
        while step < t.max_steps:
            images, caption_rows, grounding = batches(micro_step)  # on the device, as every table they come from
            with accelerator.accumulate(*trained_models):
                context, context_mask = text.states.lookup(caption_rows)  # (B, T, D), (B, T)
                terms = diffusion_loss(unet, noise_scheduler, images, context, context_mask, t.min_snr_gamma, grounding)
                loss = terms.diffusion if terms.grounding is None else terms.diffusion + t.grounding_weight * terms.grounding
                if terms.place is not None:
                    loss = loss + t.place_weight * terms.place
                accelerator.backward(loss)
                if accelerator.sync_gradients and t.grad_clip > 0:
                    accelerator.clip_grad_norm_(trained_parameters, t.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            micro_step += 1
            window.add(len(images) * accelerator.num_processes, logged_terms(terms))  # kept on the device
            if not accelerator.sync_gradients:
                continue
            lr_schedule.step()
            ema.step(unet.parameters())
            text.ema_step()
            step += 1
            bar.update(step)

            # The host reads the device only at log lines, checkpoints and validations, not every step.
            out_of_time = t.max_minutes > 0 and time.monotonic() - started > 60 * t.max_minutes
            stop = interrupt.requested(accelerator, every=t.log_every, step=step)
            log_due = step % t.log_every == 0 or step == t.max_steps
            checkpoint_due = step % t.checkpoint_every == 0 or step == t.max_steps or out_of_time
            validate_due = main and t.validate_every > 0 and (step % t.validate_every == 0 or step == t.max_steps or out_of_time)
            if log_due or checkpoint_due or validate_due or stop:
                means = window.means()
                if not all(math.isfinite(value) for value in means.values()):
                    raise diverged(means, logged_at, step, run_dir)  # before a checkpoint could keep the broken weights
            if log_due:
                scalars = window.scalars(means, lr_schedule.get_last_lr()[0])
                accelerator.log(scalars, step=step)
                bar.update(step, scalars["images_per_sec"], scalars["loss"])
                logger.info(LogWindow.line(step, scalars))
                window, logged_at = LogWindow(), step
            if out_of_time:
                logger.info("train.max_minutes=%g reached at step %d", t.max_minutes, step)
            if stop:
                bar.close()
                checkpoint()
                logger.info(
                    "stopped by Ctrl-C at step %d; checkpoint written. Continue with: python train.py --config %s "
                    "--output-dir %s --resume latest", step, run_dir / "config.yaml", run_dir,
                )
                accelerator.end_training()
                return run_dir
            if checkpoint_due:
                checkpoint()
            if validate_due:
                with ema_weights(averaged):
                    validate(run_dir, step, averaged[0][1], data.encoder, noise_scheduler.config, t, accelerator)
            if out_of_time:
                break
    bar.close()

    # 6. Export the EMA weights with everything the sampler needs.
    accelerator.wait_for_everyone()
    checksums = torch.cat([parameter_checksum(model) for model in trained_models])  # (parameters,)
    checksums = accelerator.gather(checksums[None]).cpu()  # (processes, parameters)
    replicas_identical = bool((checksums == checksums[0]).all())
    if not replicas_identical:
        logger.warning("the %d processes ended with different weights", accelerator.num_processes)
    if main:
        info = {
            "step": step, "train_dir": str(data.train_dir), "text_encoder_source": data.encoder_source, "text_encoder_tuned": text.tuned,
            "processes": accelerator.num_processes, "replicas_identical": replicas_identical,
        }
        with ema_weights(averaged):
            export_dir = export_model(run_dir, cfg, averaged[0][1], data.encoder, noise_scheduler.config, info)
        logger.info("exported the EMA model to %s; sample with: python sample.py --model %s --prompt ...", export_dir, run_dir)
    accelerator.wait_for_everyone()  # every process tears the process group down together, after the export
    accelerator.end_training()
    return run_dir


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
    last = list_checkpoints(run_dir / "checkpoints")
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
