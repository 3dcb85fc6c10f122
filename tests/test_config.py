"""YAML presets into typed dataclasses, overrides, and the errors a user sees."""

import re
from pathlib import Path

import pytest

from diffusion.config import Config, ConfigError, load_config, save_config

CONFIGS = Path(__file__).parent.parent / "configs"


@pytest.mark.parametrize("preset", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_presets_load(preset):
    cfg = load_config(CONFIGS / preset)
    assert isinstance(cfg, Config)
    assert cfg.name == Path(preset).stem


def test_overrides_set_single_fields_with_types():
    cfg = load_config(
        CONFIGS / "tiny.yaml",
        ["train.learning_rate=1e-3", "train.max_steps=7", "unet.channel_mults=[1, 2]", "data.hflip=true"],
    )
    assert cfg.train.learning_rate == 1e-3 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 7
    assert cfg.unet.channel_mults == [1, 2]
    assert cfg.data.hflip is True


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"config\.train: unknown key\(s\) learning_rat\. Valid keys: seed, batch_size"):
        load_config(path)


def test_wrong_type_names_the_field():
    with pytest.raises(ConfigError, match=r"config\.train\.max_steps: expected int, got 'many'"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.max_steps"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="train.mixed_precision must be one of auto, no, bf16, fp16"):
        load_config(None, ["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="shapes.colours"):
        load_config(None, ["data.shapes.colours=[mauve]"])


def test_missing_file_names_presets(tmp_path):
    with pytest.raises(ConfigError, match=r"not found\. Presets: .*tiny\.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.seed=5"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=-1", "train.learning_rate must be > 0"),
        ("train.batch_size=0", "train.batch_size must be >= 1"),
        ("train.caption_dropout=1", "train.caption_dropout must be >= 0 and < 1"),
        ("unet.num_res_blocks=0", "unet.num_res_blocks must be >= 1"),
        ("data.shapes.num_train=-1", "num_train"),
    ],
)
def test_out_of_range_fields_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_validation_samples_as_sample_py_does():
    """Validation images are what `python sample.py` would give at the same step count."""
    from diffusion.config import TrainConfig
    from diffusion.sampling.settings import SamplerSettings

    assert TrainConfig().validation_steps == SamplerSettings().steps
