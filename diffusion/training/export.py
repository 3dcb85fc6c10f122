"""The end of a run: its EMA weights exported as a pipeline folder that the sampler loads by path alone.

    model/  model_index.json, unet/, scheduler/, text_encoder/, tokenizer/  (TextToImagePipeline)
            config.yaml          the resolved training config
            training_info.json   step, minutes, device, precision, images, text encoder source, tuned or not, ...
            validation.png       the last validation grid (where the run validated)
            README.md            the model card (diffusion.card), a Hub model repository's README

The file names are diffusion.runs', which reads the folder back.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusion.card import VALIDATION_IMAGE, write_card
from diffusion.config import Config, save_config
from diffusion.files import atomic_dir
from diffusion.model.unet import UNet
from diffusion.runs import CONFIG_FILE, MODEL_DIR, write_training_info
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.schedulers import make_sampling_scheduler
from diffusion.sampling.settings import SamplerSettings
from diffusion.text.encoder import TextEncoder


def export_model(run_dir: Path, cfg: Config, unet: UNet, encoder: TextEncoder, noise_config: dict, info: dict) -> Path:
    """Write run_dir/model (whole or not at all) from the weights `unet` and `encoder` hold now."""
    export_dir = run_dir / MODEL_DIR
    with atomic_dir(export_dir) as tmp:
        sampler = make_sampling_scheduler(SamplerSettings().scheduler, noise_config)  # same schedule, the default sampler
        TextToImagePipeline(unet, sampler, encoder.model, encoder.tokenizer).save_pretrained(tmp)
        save_config(cfg, tmp / CONFIG_FILE)
        grids = sorted((run_dir / "validation").glob("step_*.png"))
        if grids:  # the last validation's grid, beside the card
            shutil.copyfile(grids[-1], tmp / VALIDATION_IMAGE)
            info = {**info, "validation_step": int(grids[-1].stem.removeprefix("step_"))}
        write_training_info(tmp, info)
        write_card(tmp, cfg, info, run_dir.name)
    return export_dir
