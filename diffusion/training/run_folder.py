"""The run folder: its name, its log, its config, its trackers (its file names: diffusion.runs).

    outputs/runs/<name>/
        config.yaml    the resolved config          train.log     the log
        tensorboard/   loss, lr, img/s, grids       checkpoints/  checkpoint-NNNNNN/ (resumable)
        validation/    step_NNNNNN.png + images and maps          model/        the exported model

Nothing is written into it until the data and the text encoder are ready, so a failed start leaves
no run in the way of the next attempt.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from diffusion.config import Config, save_config
from diffusion.runs import CHECKPOINTS_DIR, CONFIG_FILE, MODEL_DIR
from diffusion.training.setup import TrainingError
from diffusion.training.trackers import TrackerError, start_trackers

logger = logging.getLogger("diffusion")


def holds_run(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).exists() for name in (CHECKPOINTS_DIR, MODEL_DIR, CONFIG_FILE))


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


def shared_run_dir(cfg: Config, output_dir: str | None, resume: str | None, accelerator: Accelerator) -> Path:
    """The run folder, chosen on the main process and shared (a numbered name must be the same everywhere)."""
    if output_dir or resume:
        return choose_run_dir(cfg, output_dir, resume)
    shared = [choose_run_dir(cfg, None, None) if accelerator.is_main_process else None]
    return Path(broadcast_object_list(shared)[0])


def setup_logging(is_main: bool) -> None:
    """Console logging on the main process (warnings only elsewhere); the run's train.log joins later."""
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    if is_main and not any(type(h) is logging.StreamHandler for h in logger.handlers):
        console = logging.StreamHandler()
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)


def close_log_file() -> None:
    for handler in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(handler)
        handler.close()


def log_to_file(run_dir: Path) -> None:
    close_log_file()  # a previous run's in this process
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)


def open_run_dir(run_dir: Path, cfg: Config, accelerator: Accelerator) -> None:
    """Create the run folder (main process): the log file, the resolved config, the trackers."""
    if accelerator.is_main_process:
        new = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        log_to_file(run_dir)
        save_config(cfg, run_dir / CONFIG_FILE)
        try:
            start_trackers(accelerator, run_dir, cfg)
        except Exception as error:  # each tracker fails in its own way (no login, no server): say which, leave no run
            close_log_file()
            if new:
                shutil.rmtree(run_dir, ignore_errors=True)
            raise TrackerError(
                f"train.report_to={cfg.train.report_to}: a tracker could not start ({type(error).__name__}: {error}); "
                "fix that, or choose another tracker (train.report_to=tensorboard, or none)"
            ) from None
    accelerator.wait_for_everyone()
