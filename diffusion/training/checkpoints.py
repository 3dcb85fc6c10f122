"""Resumable checkpoints of a run: finding them, resolving --resume, pruning old ones.

Each checkpoint is written whole or not at all (diffusion.files); one counts only once its
training_state.json is there.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

from diffusion.config import Config, save_config
from diffusion.errors import UserError
from diffusion.files import commit_dir, staging_dir

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


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


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """`--resume latest` or `--resume <checkpoint folder>` -> the checkpoint folder to load."""
    if resume == "latest":
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        if not checkpoints:
            raise CheckpointError(
                f"--resume latest: {run_dir / 'checkpoints'} holds no complete checkpoint. Start a new run "
                "without --resume, or point --output-dir at the run folder you mean to continue."
            )
        return checkpoints[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(
            f"--resume {resume}: not a checkpoint folder (no {STATE_FILE}). Use 'latest' or a "
            f"checkpoint-NNNNNN folder under {run_dir / 'checkpoints'}."
        )
    return path


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text())


def prune_checkpoints(checkpoint_root: Path, keep: int) -> None:
    for _, path in list_checkpoints(checkpoint_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(path)


def save_checkpoint(accelerator: Accelerator, run_dir: Path, cfg: Config, state: dict) -> None:
    """checkpoints/checkpoint-<step>: accelerate's state of every process, the config and `state`
    (step, micro_step, context_dim); whole or not at all. Old ones beyond keep_checkpoints go."""
    final = run_dir / "checkpoints" / f"checkpoint-{state['step']:06d}"
    main = accelerator.is_main_process
    tmp = staging_dir(final) if main else final.parent / f".{final.name}.partial"
    accelerator.wait_for_everyone()  # every process writes its random state into tmp
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if main:
        save_config(cfg, tmp / "config.yaml")
        (tmp / STATE_FILE).write_text(json.dumps(state) + "\n")
        commit_dir(tmp, final)
        prune_checkpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, run_dir: Path, resume: str, cfg: Config, context_dim: int) -> dict:
    """Load the checkpoint `--resume` names into the prepared objects; returns its state."""
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
    return {**state, "checkpoint": checkpoint}
