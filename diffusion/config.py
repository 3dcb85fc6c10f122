"""Typed configuration: nested dataclasses filled from YAML, with `section.field=value` overrides.

A run's resolved config is saved beside every checkpoint and export, and every model is rebuilt
from it, so no architecture flag ever has to be repeated.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffusion.data.vocabulary import ShapesConfig
from diffusion.errors import UserError
from diffusion.text.tiny_clip_config import TinyClipConfig


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the dataclasses below."""


def ranged(default: Any, *, ge: float | None = None, gt: float | None = None, lt: float | None = None, note: str = ""):
    """A scalar field with its valid range, checked when a config is loaded (`check_ranges`)."""
    return field(default=default, metadata={"range": (ge, gt, lt), "note": note})


@dataclass
class DataConfig:
    # "shapes" (the built-in procedural set, generated on first use and cached), the path of a folder in the
    # Hugging Face imagefolder layout (image files + metadata.jsonl), or a dataset the `datasets` library reads:
    # a Hub id (owner/name) or a folder of parquet/arrow files (written into the cache as an imagefolder once).
    dataset: str = "shapes"
    image_size: int = ranged(32, ge=8)
    caption_column: str = "text"  # a caption, or a list of several (one is drawn each time the row is used)
    image_column: str = "image"  # (datasets read with the datasets library)
    split: str = "train"  # the split to train on (datasets library); its "test" or "validation" split is held out
    skip_bad_rows: bool = False
    # A folder without a test/ split: hold out this fraction of its rows as the test split (the tiny CLIP's
    # retrieval and the evaluation read it), chosen by a hash of each file name, so it stays put as images are added.
    test_fraction: float = ranged(0.0, ge=0, lt=1, note="0: train on every row")
    # Horizontal flips are off: captions speak of "left of" / "right of" and a flip would make them
    # lies. When turned on, the loader swaps the words left and right in each flipped caption.
    hflip: bool = False
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TextEncoderConfig:
    # "tiny-clip" (our own CLIP, trained offline on the dataset's captions on first use), a Hub id
    # such as "openai/clip-vit-base-patch32", or a local directory holding a saved CLIP.
    name: str = "tiny-clip"
    tiny_clip: TinyClipConfig = field(default_factory=TinyClipConfig)


@dataclass
class UNetConfig:
    in_channels: int = ranged(3, ge=1)
    base_channels: int = ranged(16, ge=1)
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 4])
    num_res_blocks: int = ranged(1, ge=1)
    # Feature-map sizes (in pixels, e.g. 16 for 16x16) that get a cross-attention layer.
    cross_attention_resolutions: list[int] = field(default_factory=lambda: [16, 8])
    # Feature-map sizes that also get self-attention (costly at high resolution).
    self_attention_resolutions: list[int] = field(default_factory=lambda: [8])
    head_dim: int = ranged(16, ge=1)
    norm_groups: int = ranged(8, ge=1)
    # Width multiple of a gated feed-forward after each cross-attention layer (0: none).
    ff_mult: int = ranged(4, ge=0, note="0: no feed-forward")
    # Add the end token's text state (CLIP's pooled output) to the timestep embedding, as SDXL does.
    pooled_text: bool = True
    # Bidirectional layers that read every token's last state and input embedding, predict where its
    # object goes and add that to its state (diffusion.model.text_placer); trained on the masks'
    # centres (train.place_weight), so a dataset without masks trains without it. 0: none.
    text_place_layers: int = ranged(2, ge=0, note="0: no placer")
    # The placer's own width: it reads the (B, T, 2D) states through a linear map to this width.
    text_place_width: int = ranged(64, ge=1)
    # Whole layouts the placer proposes per prompt: training fits the one nearest the image's masks,
    # sampling draws one per seed (diffusion.model.text_placer). 1: one mean layout per prompt.
    text_place_layouts: int = ranged(8, ge=1, note="1: one mean layout per prompt")


@dataclass
class TrainConfig:
    seed: int = ranged(0, ge=0)
    batch_size: int = ranged(128, ge=1)
    learning_rate: float = ranged(1e-3, gt=0)
    warmup_steps: int = ranged(200, ge=0)
    lr_schedule: str = "constant"  # or "cosine" (decays to zero at max_steps)
    max_steps: int = ranged(100000, ge=1)
    # Stop after this many minutes of training even if max_steps is not reached (0: no limit).
    max_minutes: float = ranged(30.0, ge=0, note="0: no time limit")
    grad_clip: float = ranged(1.0, ge=0, note="0: no clipping")
    gradient_accumulation_steps: int = ranged(1, ge=1)
    # "auto": bf16 where the hardware computes it natively (a CPU with AVX-512/AMX, a GPU that supports it;
    # fp16 on an older GPU), else fp32. "no" (fp32), "bf16" or "fp16" (on a GPU only) force one.
    mixed_precision: str = "auto"
    # Where the scalars and validation grids go (diffusion.training.trackers): tensorboard, wandb, comet_ml, mlflow,
    # trackio (several joined by commas), all (every one installed) or none. All but tensorboard are extras.
    report_to: str = "tensorboard"
    caption_dropout: float = ranged(0.1, ge=0, lt=1)
    # Weight of the grounding loss (diffusion.training.grounding): each caption word's cross-attention kept on the
    # object it names. Needs masks and word_objects in the dataset (the shapes dataset has them); 0: off.
    grounding_weight: float = ranged(0.1, ge=0, note="0 turns the grounding loss off")
    # Weight, inside the grounding loss, of its coverage term: a word's attention should reach its peak
    # across the whole object, not only on part of it (diffusion.training.grounding). 0: off.
    grounding_coverage: float = ranged(1.0, ge=0, note="0 turns the coverage term off")
    # Weight of the placer's loss (unet.text_place_layers > 0): the squared distance from each grounded
    # token's predicted object centre to its mask's centre. It trains the placer only.
    place_weight: float = ranged(1.0, ge=0)
    # Learning rate of the CLIP text tower, fine-tuned with the UNet on the same losses (its EMA weights
    # are exported with the model); 0 keeps it frozen and its states are computed once per caption.
    text_encoder_lr: float = ranged(3e-4, ge=0, note="0: frozen")
    ema_decay: float = ranged(0.999, ge=0, lt=1)
    checkpoint_every: int = ranged(500, ge=1)
    keep_checkpoints: int = ranged(2, ge=0, note="0: keep all")
    log_every: int = ranged(50, ge=1)
    validate_every: int = ranged(1000, ge=0, note="0: no validation")
    validation_prompts: list[str] = field(
        default_factory=lambda: [
            "a red circle",
            "a blue square",
            "a large green triangle",
            "a small yellow star",
            "a red circle left of a blue square",
            "a purple star above an orange circle",
        ]
    )
    validation_steps: int = ranged(100, ge=1, note="sample.py's default")  # the guidance and sampler are sample.py's


@dataclass
class Config:
    name: str = "cpu"
    # Where the generated dataset and the trained tiny CLIP are cached between runs.
    cache_dir: str = "outputs/cache"
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------
# Filling dataclasses from plain dicts, with type checks that name the valid keys.


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, where)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and not isinstance(value, bool):
        # YAML reads "1e-3" (no dot) as a string; accept it and ints as floats.
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{where}: unsupported annotation {annotation!r}")


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build dataclass `cls` from `values`; unknown keys and wrong types are errors."""
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}. Valid keys: {', '.join(types)}"
        )
    kwargs = {name: _coerce(v, types[name], f"{where}.{name}") for name, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as error:  # a section's own checks (e.g. ShapesConfig.validate)
        raise ConfigError(f"{where}: {error}") from None


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: write it as section.field=value, e.g. train.batch_size=32")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Set single fields, e.g. ['train.learning_rate=3e-4', 'unet.channel_mults=[1,2]']."""
    for text in overrides:
        path, value = _parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (or the built-in defaults when `path` is None) and apply overrides."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            presets = sorted(p.name for p in Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))
            raise ConfigError(f"config file {path} not found. Presets: {', '.join(presets) or 'none'}")
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        values = loaded or {}
    config = from_dict(Config, apply_overrides(values, overrides or []))
    validate_config(config)
    return config


def _choose(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where} must be one of {', '.join(allowed)}; got {value!r}")


def _range_text(ge, gt, lt) -> str:
    low = f">= {ge:g}" if ge is not None else f"> {gt:g}" if gt is not None else ""
    high = f"< {lt:g}" if lt is not None else ""
    return " and ".join(part for part in (low, high) if part)


def check_ranges(section: Any, where: str) -> None:
    """Every `ranged` field of `section` and its sub-sections inside its range, or a ConfigError naming it."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{where}{f.name}.")
        elif "range" in f.metadata:
            ge, gt, lt = f.metadata["range"]
            if (ge is not None and value < ge) or (gt is not None and value <= gt) or (lt is not None and value >= lt):
                note = f" ({f.metadata['note']})" if f.metadata["note"] else ""
                raise ConfigError(f"{where}{f.name} must be {_range_text(ge, gt, lt)}{note}; got {value!r}")


def validate_config(cfg: Config) -> None:
    """Checks across fields, so a bad config fails at load time with the field's name."""
    check_ranges(cfg, "")
    _choose("train.mixed_precision", cfg.train.mixed_precision, ("auto", "no", "bf16", "fp16"))
    _choose("train.lr_schedule", cfg.train.lr_schedule, ("cosine", "constant"))
    u = cfg.unet
    if not u.channel_mults:
        raise ConfigError("unet.channel_mults must list at least one level, e.g. [1, 2, 2]")
    if cfg.data.image_size % 2 ** (len(u.channel_mults) - 1):
        raise ConfigError(
            f"data.image_size {cfg.data.image_size} must be divisible by 2^{len(u.channel_mults) - 1} "
            f"for {len(u.channel_mults)} UNet levels"
        )
    for width in (cfg.unet.base_channels * m for m in u.channel_mults):
        if width % u.head_dim or width % u.norm_groups:
            raise ConfigError(
                f"every level's width (unet.base_channels x channel_mults: {width}) must be divisible by "
                f"unet.head_dim ({u.head_dim}) and unet.norm_groups ({u.norm_groups})"
            )
    if cfg.data.test_fraction > 0 and cfg.data.dataset == "shapes":
        raise ConfigError("data.test_fraction splits a folder of your own; the shapes dataset has its own test split (data.shapes.num_test)")
    if cfg.train.grounding_weight > 0 and not u.cross_attention_resolutions:
        raise ConfigError("train.grounding_weight > 0 needs cross-attention: list unet.cross_attention_resolutions")
    if any(m < 1 for m in u.channel_mults):
        raise ConfigError(f"unet.channel_mults must all be >= 1, got {u.channel_mults}")


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
