"""The run folder's layout (diffusion.runs): finding the model, the run's name, its config and training info."""

import json
import shutil

import pytest

from diffusion.config import load_config
from diffusion.errors import UserError
from diffusion.evaluation.prompts import build_tasks
from diffusion.runs import (
    ModelLoadError,
    find_model_dir,
    read_run_config,
    read_training_info,
    run_name,
    shapes_info,
    write_training_info,
)


def test_a_run_folder_and_its_model_folder_name_the_same_model_and_run(finished_run, tmp_path):
    model = finished_run / "model"
    assert find_model_dir(finished_run) == model and find_model_dir(model) == model
    assert run_name(model) == finished_run.name == "tiny"
    copied = shutil.copytree(model, tmp_path / "mine")  # an exported model anywhere is named after its own folder
    assert find_model_dir(copied) == copied and run_name(copied) == "mine"


def test_a_folder_without_a_model_is_refused_with_what_to_do(tmp_path):
    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match="without an exported model.*--resume latest"):
        find_model_dir(tmp_path / "unfinished")
    with pytest.raises(ModelLoadError, match="not a run folder or an exported model: expected .*model_index.json"):
        find_model_dir(tmp_path)
    assert issubclass(ModelLoadError, UserError)  # the commands print it in one line


def test_the_export_holds_its_config_and_training_info(finished_run, tmp_path):
    model = find_model_dir(finished_run)
    assert read_run_config(model) == load_config(finished_run / "config.yaml")
    info = read_training_info(model)
    assert info["step"] == 40 and info["train_dir"].endswith("train")
    bare = tmp_path / "bare"
    bare.mkdir()
    assert read_training_info(bare) == {}
    with pytest.raises(UserError, match="has no config.yaml"):
        read_run_config(bare)
    (bare / "config.yaml").write_text("unet: {no_such_field: 1}\n")
    with pytest.raises(UserError, match=str(bare / "config.yaml")):
        read_run_config(bare)


def test_training_info_reads_back_as_written(tmp_path):
    info = {"step": 7, "train_dir": "/data/train", "text_encoder_tuned": False}
    write_training_info(tmp_path, info)
    assert read_training_info(tmp_path) == info
    assert (tmp_path / "training_info.json").read_text().endswith("\n")


def test_a_model_is_judged_by_the_held_out_compositions_of_the_data_it_trained_on(finished_run, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(finished_run / "model", model)
    cfg = read_run_config(model)
    now, _ = shapes_info(cfg, model)  # the folder training_info.json names
    assert now["held_out_relations"][:1] == cfg.data.shapes.held_out_relations
    # A model trained on an older version of the data, where another composition was held out.
    older = tmp_path / "older"
    (older / "train").mkdir(parents=True)
    (older / "dataset_info.json").write_text(json.dumps({**now, "held_out_relations": ["star left of circle"]}))
    write_training_info(model, {**read_training_info(model), "train_dir": str(older / "train")})
    then, source = shapes_info(cfg, model)
    assert then["held_out_relations"] == ["star left of circle"] and source == str(older / "dataset_info.json")
    held_out = next(task for task in build_tasks(then) if task.name == "held_out")
    assert any(p.relations and p.text.split()[2:5] == ["star", "left", "of"] for p in held_out.prompts)


def test_without_its_data_a_shapes_run_rebuilds_the_description_from_its_config(finished_run, tmp_path):
    cfg = read_run_config(find_model_dir(finished_run))
    cached, source = shapes_info(cfg)  # no model: the cached dataset the config names
    assert source.startswith(cfg.cache_dir) and source.endswith("dataset_info.json")
    cfg.cache_dir = str(tmp_path / "empty-cache")
    rebuilt, source = shapes_info(cfg)
    assert source == "rebuilt from the run's config (no cached dataset found)"
    assert rebuilt["counts"]["test_held_out"] is None
    assert {k: v for k, v in rebuilt.items() if k != "counts"} == {k: v for k, v in cached.items() if k != "counts"}
