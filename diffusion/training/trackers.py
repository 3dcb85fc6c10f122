"""Where a run reports its scalars and validation grids: the trackers the user names in `train.report_to`,
through accelerate's, as diffusers' train_text_to_image.py takes `--report_to`.

Each tracker but TensorBoard (a dependency) is an optional extra, checked before any preparation:

    train.report_to=tensorboard   run folder's tensorboard/ (the default)
    train.report_to=wandb         Weights & Biases, into <run>/wandb/ (WANDB_MODE=offline runs without an account)
    train.report_to=comet_ml | mlflow | trackio | wandb,tensorboard | all (every one installed) | none
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from accelerate import Accelerator
from PIL import Image

from diffusion.config import Config, to_dict
from diffusion.errors import UserError

PROJECT = "crossattn-diffusion"  # the project the trackers file runs under (W&B, Comet, MLflow, Trackio)
# tracker -> (the module it needs, the extra that installs it)
TRACKERS = {
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "comet_ml": ("comet_ml", "comet"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}


class TrackerError(UserError, ValueError):
    """train.report_to names an unknown tracker, or one that is not installed."""


def installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def chosen_trackers(report_to: str) -> list[str]:
    """train.report_to -> the trackers to start, each checked to be known and installed."""
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if names == ["none"]:
        return []
    if names == ["all"]:
        return [name for name in TRACKERS if installed(name)]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise TrackerError(
            f"train.report_to={report_to!r}: choose {', '.join(TRACKERS)} (several joined by commas), all (every one "
            "installed) or none"
        )
    for name in names:
        module, extra = TRACKERS[name]
        if not installed(name):
            raise TrackerError(
                f"train.report_to={name} needs the {module} package, which is not installed: "
                f'pip install -e ".[{extra}]" (or choose another tracker, or none)'
            )
    if "wandb" in names and not wandb_can_log():
        raise TrackerError(
            "train.report_to=wandb: W&B has no API key here. Run `wandb login` (or set WANDB_API_KEY), or set "
            "WANDB_MODE=offline to keep the run in <run>/wandb/ (`wandb sync` uploads it later)"
        )
    return list(dict.fromkeys(names))


def wandb_can_log() -> bool:
    """Whether W&B runs offline or has an API key (the environment's, or the one `wandb login` writes to ~/.netrc)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def start_trackers(accelerator: Accelerator, run_dir: Path, cfg: Config) -> None:
    """Start the accelerator's trackers for this run (main process): TensorBoard in <run>/tensorboard/,
    W&B's files in <run>/wandb/, MLflow's in <run>/mlruns/, each run named after the run folder."""
    accelerator.project_configuration.logging_dir = str(run_dir / "tensorboard")
    init_kwargs = {
        "wandb": {"name": run_dir.name, "dir": str(run_dir)},
        "mlflow": {"logging_dir": str(run_dir / "mlruns"), "run_name": run_dir.name},
        "trackio": {"name": run_dir.name},
    }
    accelerator.init_trackers(PROJECT, config=flat_config(to_dict(cfg)), init_kwargs=init_kwargs)


def flat_config(values: dict, prefix: str = "") -> dict:
    """A config as the trackers record it: `section.field` keys, lists as text (TensorBoard takes scalars only)."""
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def log_grid(accelerator: Accelerator, grid: Image.Image, step: int) -> None:
    """The validation grid to every tracker that keeps images (TensorBoard, W&B); the others keep the scalars."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": [grid]}, step=step)
