"""Run-folder persistence: resumable checkpoints and the exported model.

Everything is written into a hidden temporary folder first and renamed into place once complete,
so a run killed at any moment never leaves a half-written checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from diffusion.errors import UserError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"


class CheckpointError(UserError, RuntimeError):
    """A resume that cannot find what it needs."""


def staging_dir(final: Path) -> Path:
    """A fresh, empty hidden sibling of `final` to write into before the atomic rename."""
    tmp = final.parent / f".{final.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp: Path, final: Path) -> None:
    """Move a completely written folder into place (replacing an older one of the same name)."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


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
