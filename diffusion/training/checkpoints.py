"""Resumable checkpoints of a run: finding them, resolving --resume, pruning old ones.

Each checkpoint is written whole or not at all (diffusion.files); one counts only once its
training_state.json is there.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import zipfile
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors import safe_open

from diffusion.config import Config, save_config
from diffusion.errors import UserError
from diffusion.files import commit_dir, staging_dir
from diffusion.runs import CHECKPOINTS_DIR, CONFIG_FILE

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


logger = logging.getLogger("diffusion")


class CheckpointError(UserError, RuntimeError):
    """A resume that cannot find what it needs."""


def list_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `checkpoint_root`, oldest first, as (step, path)."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for path in checkpoint_root.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def damage(checkpoint: Path) -> str | None:
    """What makes a checkpoint unreadable (a file cut short by a full disk or a crash), or None if every
    file reads whole: safetensors files by their header, torch.save's zip files by their directory and CRCs."""
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, "pt"):
                    pass
            elif path.suffix in (".bin", ".pkl", ".pt"):
                with zipfile.ZipFile(path) as archive:
                    bad = archive.testzip()
                if bad is not None:
                    return f"{path.name} is damaged ({bad} fails its checksum)"
        except Exception as error:  # SafetensorError has no narrower base class
            return f"{path.name} cannot be read ({str(error).splitlines()[0][:120]})"
    return None


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """`--resume latest` -> the newest complete, readable checkpoint (saying which newer ones are damaged);
    `--resume <checkpoint folder>` -> that folder, if it is whole."""
    checkpoints = list_checkpoints(run_dir / CHECKPOINTS_DIR)
    if resume == "latest":
        if not checkpoints:
            raise CheckpointError(
                f"--resume latest: {run_dir / 'checkpoints'} holds no complete checkpoint. Start a new run "
                "without --resume, or point --output-dir at the run folder you mean to continue."
            )
        damaged = []
        for _, path in reversed(checkpoints):
            problem = damage(path)
            if problem is None:
                for bad, why in damaged:
                    logger.warning("%s is damaged (%s): resuming from %s, the newest whole checkpoint. The damaged folder is "
                                   "left as it is until this run writes that step again.", bad, why, path.name)
                return path
            damaged.append((path, problem))
        raise CheckpointError(
            f"--resume latest: every checkpoint in {run_dir / 'checkpoints'} is damaged ("
            + "; ".join(f"{path.name}: {why}" for path, why in damaged)
            + "). Nothing can be resumed: start the run again with another --output-dir."
        )
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}). Use 'latest' or a "
            f"checkpoint-NNNNNN folder under {run_dir / 'checkpoints'}."
        )
    problem = damage(path)
    if problem is not None:
        whole = [p for _, p in reversed(checkpoints) if p.resolve() != path.resolve() and damage(p) is None]
        fix = f"Resume from {whole[0]}, the newest whole checkpoint." if whole else "No whole checkpoint is left to resume from."
        raise CheckpointError(f"--resume {resume}: the checkpoint is damaged: {problem}. {fix}")
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def prune_checkpoints(checkpoint_root: Path, keep: int) -> None:
    for _, path in list_checkpoints(checkpoint_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, cfg: Config, state: dict) -> None:
    """checkpoints/checkpoint-<step>: accelerate's state of every process, the config and `state`
    (step, micro_step, context_dim); whole or not at all. Old ones beyond keep_checkpoints go."""
    final = run_dir / CHECKPOINTS_DIR / f"checkpoint-{state['step']:06d}"
    main = accelerator.is_main_process
    tmp = staging_dir(final) if main else final.parent / f".{final.name}.partial"
    accelerator.wait_for_everyone()  # every process writes its random state into tmp
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        save_config(cfg, tmp / CONFIG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        commit_dir(tmp, final)
        prune_checkpoints(run_dir / CHECKPOINTS_DIR, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def restore_onto_device(averages: list[EMAModel], device: torch.device) -> None:
    """Put the training state that is not a prepared module on the training device: the EMA weights (accelerate
    loads such custom state onto the CPU). Called once after preparation and again after every load."""
    for average in averages:
        average.to(device)


def load_checkpoint(
    accelerator: Accelerator, run_dir: Path, resume: str, cfg: Config, context_dim: int, averages: list[EMAModel]
) -> dict:
    """Load the checkpoint `--resume` names into the prepared objects, every part on the training device;
    returns its state."""
    checkpoint = resolve_resume(run_dir, resume)
    state = read_state(checkpoint)
    own_config = (
        f"Resume with the checkpoint's own config: python train.py --config {checkpoint / 'config.yaml'} "
        f"--output-dir {run_dir} --resume latest"
    )
    if state.get("context_dim", context_dim) != context_dim:
        raise CheckpointError(
            f"{checkpoint} was trained with text states of width {state['context_dim']}, but the text encoder "
            f"{cfg.text_encoder.name!r} gives width {context_dim}. {own_config}"
        )
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, ValueError) as error:
        raise CheckpointError(
            f"{checkpoint} does not fit the model this config builds ({str(error).splitlines()[0][:200]}). {own_config}"
        ) from None
    restore_onto_device(averages, accelerator.device)
    return {**state, "checkpoint": checkpoint}
