"""A run folder's layout: the one owner of its file names, and the readers of what it holds.

    outputs/runs/<name>/          what train.py writes (diffusion.training.run_folder)
        config.yaml               the resolved config
        checkpoints/              checkpoint-NNNNNN/ (resumable)
        model/                    the exported model (diffusion.training.export), what the sampler loads:
            model_index.json      diffusers' index of unet/, scheduler/, text_encoder/, tokenizer/
            config.yaml           the resolved training config
            training_info.json    step, train_dir (the data it learned from), text encoder source, ...

A model folder is a run's model/ or such a folder copied anywhere; commands take either the run folder
or the model folder (`find_model_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion.config import Config, ConfigError, load_config
from diffusion.data.hub import is_hub_id
from diffusion.data.shapes import dataset_info, shapes_dir
from diffusion.errors import UserError

MODEL_DIR = "model"
CONFIG_FILE = "config.yaml"
TRAINING_INFO_FILE = "training_info.json"
CHECKPOINTS_DIR = "checkpoints"
MODEL_INDEX_FILE = "model_index.json"  # diffusers' name (DiffusionPipeline.save_pretrained)


class ModelLoadError(UserError, OSError):
    """A --model folder that is neither a run folder nor an exported model."""


def find_model_dir(path: str | Path) -> Path:
    """A run folder (holding model/), an exported model folder itself, or a Hub id (owner/name) of one,
    downloaded into the Hugging Face cache (read from there when offline)."""
    if is_hub_id(str(path)):
        return download_model(str(path))
    path = Path(path)
    for candidate in (path / MODEL_DIR, path):
        if (candidate / MODEL_INDEX_FILE).is_file():
            return candidate
    if (path / CHECKPOINTS_DIR).is_dir():
        raise ModelLoadError(
            f"{path} is a run folder without an exported model (training has not finished). Finish or resume it "
            f"with: python train.py --output-dir {path} --resume latest"
        )
    raise ModelLoadError(
        f"{path} is not a run folder or an exported model: expected {path}/{MODEL_DIR}/{MODEL_INDEX_FILE} or "
        f"{path}/{MODEL_INDEX_FILE}. Pass --model the folder that train.py wrote (outputs/runs/<name>)."
    )


def download_model(repo_id: str) -> Path:
    """The Hub model repository `repo_id` as a local folder (huggingface_hub's cache), or a ModelLoadError."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id))
    except RepositoryNotFoundError:
        raise ModelLoadError(f"--model {repo_id}: no such model on the Hugging Face Hub (nor a folder of that name here)") from None
    except LocalEntryNotFoundError as error:  # offline, or the Hub unreachable, and no copy in the cache
        raise ModelLoadError(
            f"--model {repo_id}: cannot download it from the Hugging Face Hub and the cache holds no copy ({error}); "
            "connect, or pass the path of a model folder"
        ) from None


def run_name(model_dir: Path) -> str:
    """outputs/runs/<name>/model -> <name>; a Hub model in the cache (models--owner--name/snapshots/<commit>)
    -> name; any other model folder -> its own name."""
    if model_dir.parent.name == "snapshots" and model_dir.parent.parent.name.startswith("models--"):
        return model_dir.parent.parent.name.split("--")[-1]
    return model_dir.parent.name if model_dir.name == MODEL_DIR else model_dir.name


def read_run_config(model_dir: Path) -> Config:
    """The resolved training config saved with the export (model/config.yaml)."""
    path = model_dir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{model_dir} has no {CONFIG_FILE}, so what data the model was trained on is unknown")
    try:
        return load_config(path)
    except ConfigError as error:
        raise UserError(f"{path}: {error}") from None


def read_training_info(model_dir: Path) -> dict:
    """The export's training_info.json ({} when it has none)."""
    path = model_dir / TRAINING_INFO_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_training_info(model_dir: Path, info: dict) -> None:
    (model_dir / TRAINING_INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")


def shapes_info(cfg: Config, model_dir: Path | None = None) -> tuple[dict, str]:
    """The dataset's dataset_info.json (held-out pairs and relations, palette, config), and where it came from.

    Read from the folder the model was trained on (training_info.json's train_dir) when it is there, so a
    model is judged by its own data; else from the cached dataset its config names now; else rebuilt from
    the run's config, which defines the dataset completely (only the held-out row count is then unknown).
    """
    candidates = [shapes_dir(cfg.data.shapes, Path(cfg.cache_dir)) / "dataset_info.json"]
    recorded = read_training_info(model_dir).get("train_dir") if model_dir is not None else None
    if recorded:
        candidates.insert(0, Path(recorded).parent / "dataset_info.json")
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text()), str(path)
    return dataset_info(cfg.data.shapes, num_test_held_out=None), "rebuilt from the run's config (no cached dataset found)"
