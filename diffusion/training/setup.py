"""What a run settles before its first step: the checks that take seconds, the UNet a config builds,
the mixed precision the hardware can run, and the data and text encoder, prepared once and cached."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator

from diffusion.config import Config, ConfigError
from diffusion.data.folder import CaptionedImageFolder, has_grounding, swap_left_right
from diffusion.devices import native_bf16
from diffusion.errors import UserError
from diffusion.model.unet import UNet
from diffusion.text.encoder import TextEncoder, TextEncoderLoadError, load_error_message
from diffusion.training.grounding import TokenObjectTable
from diffusion.training.prepare import TINY_CLIP, prepare_dataset, prepare_text_encoder
from diffusion.training.validation import own_validation_prompts


class TrainingError(UserError, RuntimeError):
    """Training cannot start or go on (a taken run folder, too little data, a diverged loss)."""


def build_unet(cfg: Config, context_dim: int) -> UNet:
    """The UNet described by a config; the text encoder fixes the width of its keys and values."""
    try:
        return UNet(sample_size=cfg.data.image_size, context_dim=context_dim, **asdict(cfg.unet))
    except ValueError as error:  # e.g. an attention resolution this UNet does not have
        raise ConfigError(str(error)) from None


def text_width(cfg: Config) -> int:
    """The width of the text states the UNet reads, from the encoder's config without loading its weights."""
    copies = 2 if cfg.unet.text_place_layers else 1  # the placer reads last hidden state | input embedding
    if cfg.text_encoder.name == TINY_CLIP:
        return copies * cfg.text_encoder.tiny_clip.text_width
    from transformers import CLIPTextConfig

    try:
        return copies * CLIPTextConfig.from_pretrained(cfg.text_encoder.name).hidden_size
    except (OSError, ValueError) as error:
        raise TextEncoderLoadError(load_error_message(cfg.text_encoder.name, error)) from error


def dry_run_report(cfg: Config) -> str:
    """The resolved config as YAML and the size of the UNet it describes."""
    unet = build_unet(cfg, text_width(cfg))
    params = sum(p.numel() for p in unet.parameters())
    layers = ", ".join(f"{name} ({size}x{size})" for name, size in unet.cross_attention_layers.items())
    return (
        yaml.safe_dump(asdict(cfg), sort_keys=False)
        + f"\nUNet parameters: {params:,} ({params / 1e6:.2f}M)\ncross-attention layers: {layers}"
    )


def check_can_start(cfg: Config, device: torch.device) -> None:
    """What can be checked in seconds, before minutes go into preparing data and a text encoder:
    the dataset folder exists, the config builds a UNet, and the device can run its precision."""
    resolve_precision(cfg.train.mixed_precision, device)
    if cfg.data.dataset != "shapes" and not Path(cfg.data.dataset).is_dir():
        prepare_dataset(cfg.data, Path(cfg.cache_dir))  # raises its DatasetError, which names the fix
    build_unet(cfg, text_width(cfg))


def resolve_precision(setting: str, device: torch.device) -> tuple[str, str]:
    """train.mixed_precision -> (what accelerate gets, why). "auto" takes bf16 only where the hardware
    computes it natively (emulated bf16 is many times slower): on a GPU fp16 otherwise, on a CPU fp32."""
    if setting == "fp16" and device.type != "cuda":
        raise TrainingError(
            f"train.mixed_precision=fp16 is for a GPU; on the {device.type.upper()} it would train slowly in emulated "
            "fp16. Use auto (bf16 where this CPU computes it natively, else fp32), bf16 or no."
        )
    if setting != "auto":
        return setting, "as configured"
    if device.type == "cuda":
        return ("bf16", "the GPU computes bf16 natively") if native_bf16(device) else ("fp16", "the GPU has no native bf16")
    capability = torch.backends.cpu.get_cpu_capability()
    if native_bf16(device):
        return "bf16", f"this CPU ({capability}) computes bf16 natively"
    return "no", f"this CPU ({capability}) has no native bf16, which would run many times slower than fp32"


@dataclass
class TrainingData:
    """The images, their captions (with left/right-swapped twins under hflip) and the text encoder."""

    dataset: CaptionedImageFolder
    train_dir: Path
    captions: list[str]
    encoder: TextEncoder
    encoder_source: str  # where the encoder was loaded from (the cached tiny CLIP, a Hub id, a folder)
    token_objects: TokenObjectTable | None  # which object each caption token names; None: no grounding loss


def prepare_training_data(cfg: Config, accelerator: Accelerator, progress: bool) -> TrainingData:
    """Dataset and text encoder, prepared once on the main process and cached. The dataset is read
    first, so a bad folder fails before minutes are spent training a tiny CLIP on it. The grounding
    loss needs masks: a folder whose rows name none trains without it (the loop says so)."""
    cache_dir = Path(cfg.cache_dir)
    with accelerator.main_process_first():
        dataset_dirs = prepare_dataset(cfg.data, cache_dir, progress=progress)
    grounded = cfg.train.grounding_weight > 0 and has_grounding(dataset_dirs[0])
    dataset = CaptionedImageFolder(
        dataset_dirs[0], cfg.data.image_size, cfg.data.caption_column, cfg.data.skip_bad_rows, cfg.data.hflip,
        progress=progress, masks=grounded, spill_dir=cache_dir,
    )
    with accelerator.main_process_first():
        source = prepare_text_encoder(cfg.text_encoder, cfg.data, cache_dir, progress=progress, dataset_dirs=dataset_dirs)
    placer = grounded and cfg.unet.text_place_layers > 0  # it reads each token's input embedding beside its last state
    encoder = TextEncoder.from_pretrained(source, input_embeddings=placer).to(accelerator.device)
    captions = dataset.all_captions
    if cfg.data.hflip:
        captions += [swap_left_right(c) for c in captions]
    token_objects = TokenObjectTable(encoder.tokenizer, encoder.max_length) if grounded else None
    return TrainingData(dataset, dataset_dirs[0], captions, encoder, source, token_objects)


def settle_config(cfg: Config, data: TrainingData) -> tuple[Config, list[str]]:
    """The config as this run trains it (saved with the run, so the model is rebuilt as trained), and the
    log lines that say what changed: a dataset of one's own gets six of its own captions as validation
    prompts, and one without masks trains without the text placer. `cfg` itself is left as it was."""
    notes = []
    train, unet = cfg.train, cfg.unet
    own_prompts = own_validation_prompts(cfg, data.dataset.captions)
    if own_prompts is not None:
        train = replace(train, validation_prompts=own_prompts)
        notes.append(f"validation prompts: {own_prompts} (six of the dataset's own captions; set train.validation_prompts to choose)")
    if data.token_objects is None and unet.text_place_layers > 0:
        unet = replace(unet, text_place_layers=0)
        notes.append("training without the text placer: it learns where objects go from their masks "
                     "(train.grounding_weight > 0 and a dataset with masks)")
    if train.grounding_weight > 0 and data.token_objects is None:
        notes.append("no row of the dataset has mask_file and word_objects: training without the grounding loss")
    return replace(cfg, train=train, unet=unet), notes
