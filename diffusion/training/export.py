"""The end of a run: its EMA weights exported as a pipeline folder that the sampler loads by path alone.

    model/  model_index.json, unet/, scheduler/, text_encoder/, tokenizer/  (TextToImagePipeline)
            config.yaml          the resolved training config
            training_info.json   step, text encoder source, tuned or not, processes
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusion.config import Config, save_config
from diffusion.files import atomic_dir
from diffusion.model.unet import UNet
from diffusion.sampling.pipeline import TextToImagePipeline
from diffusion.sampling.schedulers import make_sampling_scheduler
from diffusion.sampling.settings import SamplerSettings
from diffusion.text.encoder import TextEncoder


def export_model(run_dir: Path, cfg: Config, unet: UNet, encoder: TextEncoder, noise_config: dict, info: dict) -> Path:
    """Write run_dir/model (whole or not at all) from the weights `unet` and `encoder` hold now."""
    export_dir = run_dir / "model"
    with atomic_dir(export_dir) as tmp:
        sampler = make_sampling_scheduler(SamplerSettings().scheduler, noise_config)  # same schedule, the default sampler
        TextToImagePipeline(unet, sampler, encoder.model, encoder.tokenizer).save_pretrained(tmp)
        save_config(cfg, tmp / "config.yaml")
        (tmp / "training_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return export_dir
