"""The evaluation end to end on the tiny trained run (scores meaningless: the machinery is what is checked)."""

import json
import shutil
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from diffusion.data.scenes import SceneObject, describe
from diffusion.data.shapes import dataset_info, render_scene
from diffusion.data.vocabulary import ShapesConfig
from diffusion.evaluation.cli import main
from diffusion.evaluation.detector import DetectorSettings, detect
from diffusion.evaluation.fidelity import ImageRecord, evaluate_fidelity
from diffusion.evaluation.localisation import score_map, score_uniform
from diffusion.evaluation.prompts import Task, build_tasks, check
from diffusion.evaluation.report import TILE_WIDTH, failure_grid
from diffusion.data.relations import RELATIONS
from diffusion.runs import find_model_dir, read_run_config
from diffusion.training.loop import train
from diffusion.training.prepare import prepare_text_encoder

from conftest import tiny_config

TASKS = ["single_object", "colour", "shape", "two_objects", "colour_binding", "spatial", "size", "held_out", "three_objects"]


def in_unit_interval(value):
    return value is None or 0.0 <= value <= 1.0


def two_object_scene(first, second, first_x):
    """Two medium objects given as (shape, colour), the first at x = first_x, the second mirrored: (32, 32, 3)."""
    objects = [SceneObject(*first, "medium", (first_x, 16.0), 6.0), SceneObject(*second, "medium", (32 - first_x, 16.0), 6.0)]
    return render_scene(objects, 32)[0]


@pytest.fixture(scope="module")
def quick_eval(finished_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "tiny"
    args = ["--device", "cpu", "--model", str(finished_run), "--quick", "--seeds", "1", "--steps", "4", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


def test_files_tasks_and_baselines(quick_eval):
    results = json.loads((quick_eval / "results.json").read_text())
    assert {"model", "settings", "fidelity", "localisation", "per_image"} <= set(results)
    fidelity = results["fidelity"]
    assert fidelity["applies"] and list(fidelity["tasks"]) == TASKS
    assert in_unit_interval(fidelity["overall"])
    # The overall counts each distinct prompt set once: clause-only rows grade the same images again.
    assert set(fidelity["overall_over"]) == {"single_object", "spatial", "size"}
    assert fidelity["overall"] == pytest.approx(
        sum(fidelity["tasks"][n]["score"] for n in fidelity["overall_over"]) / 3)
    for task in fidelity["tasks"].values():
        assert in_unit_interval(task["score"]) and task["images"] == sum(p["images"] for p in task["prompts"]) > 0
    (section,) = results["localisation"]
    assert section["threshold"] == 0.5 and section["thresholds"] == [0.3, 0.4, 0.5, 0.6, 0.7]
    counts = section["counts"]
    assert counts["objects"] == counts["scored"] + counts["object_not_found"] + counts["word_not_in_maps"]
    assert set(section["table"]) == {"colour", "shape"}
    for kinds in section["table"].values():  # n = 0 when the tiny model drew no recognisable object
        assert set(kinds) == {"own", "own_two_objects", "swapped", "uniform"}
        for summary in kinds.values():
            assert in_unit_interval(summary["pointing"]) and all(in_unit_interval(v) for v in summary["miou"].values())
    markdown = (quick_eval / "results.md").read_text()
    assert "| **overall** |" in markdown and "baseline: uniform map" in markdown
    assert "| held_out |" in markdown and "| three_objects |" in markdown
    images = sorted(p.name for p in (quick_eval / "samples").glob("*.png"))
    assert len(images) == results["images"] == len(results["per_image"])
    assert all((quick_eval / "samples" / n).with_suffix(".attn").joinpath("maps.npz").is_file() for n in images)
    any_failed = any(not v["passed"] for image in results["per_image"] for v in image["verdicts"].values())
    assert (quick_eval / "failures.png").is_file() == any_failed


def test_the_evaluation_writes_its_table_into_the_model_card(quick_eval, finished_run):
    from diffusion.card import CARD_FILE, EVALUATION_END, EVALUATION_START, split_card

    results = json.loads((quick_eval / "results.json").read_text())
    header, body = split_card((finished_run / "model" / CARD_FILE).read_text())
    section = body.split(EVALUATION_START)[1].split(EVALUATION_END)[0]
    assert header["pipeline_tag"] == "text-to-image" and "Not evaluated yet" not in section
    assert f"| **overall** | mean over the distinct prompt sets (single_object, spatial, size) | **{results['fidelity']['overall']:.3f}** |" in section
    assert f"1 seed(s) per prompt, 4 ddpm steps, guidance 3.0, layout guidance 0.05 (quick); {results['images']} images" in section
    for name, task in results["fidelity"]["tasks"].items():
        assert f"| {task['score']:.3f} | {task['passed']} / {task['images']} |" in section, name
    assert "asked (row), drawn (column)" not in section  # the confusion tables stay in results.md


def test_rerun_reuses_samples_and_refuses_other_settings(finished_run, quick_eval, capsys):
    args = ["--device", "cpu", "--model", str(finished_run), "--quick", "--seeds", "1", "--out", str(quick_eval), "--no-progress"]
    assert main([*args, "--steps", "4"]) == 0
    assert "0 image(s) sampled" in capsys.readouterr().out
    assert main([*args, "--steps", "5"]) == 2
    assert "other settings" in capsys.readouterr().err
    for other in (["--scheduler", "euler"], ["--layout-guidance", "1"]):
        assert main([*args, "--steps", "4", *other]) == 2
        assert "other settings" in capsys.readouterr().err
    # A stored manifest is compared on the expected keys as they are: one without layout_guidance is another
    # image's, a key outside them (the retired guidance_rescale) is not looked at.
    manifest = next((quick_eval / "samples").glob("*.attn")) / "manifest.json"
    original = manifest.read_text()
    recorded = json.loads(original)
    without_layout_guidance = {k: v for k, v in recorded.items() if k != "layout_guidance"}
    for stored, status in (({**recorded, "guidance_rescale": 0.7}, 0), (without_layout_guidance, 2)):
        manifest.write_text(json.dumps(stored))
        assert main([*args, "--steps", "4"]) == status
        assert ("other settings" in capsys.readouterr().err) == bool(status)
    manifest.write_text(original)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--scheduler", "plms"], "unknown --scheduler 'plms'"),
        (["--layout-guidance", "-0.5"], "--layout-guidance must be >= 0"),
    ],
)
def test_bad_sampler_flags(finished_run, tmp_path, capsys, flags, message):
    assert main(["--device", "cpu", "--model", str(finished_run), "--out", str(tmp_path / "eval"), *flags]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "eval").exists()


def test_localisation_scores():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:6] = True
    perfect = score_map(mask.astype(np.float32) * 0.3, mask)
    assert perfect["pointing"] == 1.0 and set(perfect["iou"].values()) == {1.0}
    elsewhere = score_map(np.roll(mask, 4, axis=0).astype(np.float32), mask)
    assert elsewhere["pointing"] == 0.0 and set(elsewhere["iou"].values()) == {0.0}
    assert score_uniform(mask) == {"iou": {t: 8 / 64 for t in perfect["iou"]}, "pointing": 8 / 64, "coverage": 1.0}
    assert perfect["coverage"] == 8 / 64


def test_grading_on_rendered_scenes():
    """The clauses on ground-truth renderings: the right scene passes, a wrong one fails for the right reason."""
    info = dataset_info(ShapesConfig(num_train=0, num_test=0), num_test_held_out=0)
    tasks = {t.name: t for t in build_tasks(info)}
    prompt = tasks["spatial"].prompts[0]  # "a red circle left of a green square"
    assert [r.relation for r in prompt.relations] == ["left of"]
    a, b = prompt.objects
    assert check(prompt, detect(two_object_scene((a.shape, a.colour), (b.shape, b.colour), 8.0)), "all").passed
    verdict = check(prompt, detect(two_object_scene((a.shape, a.colour), (b.shape, b.colour), 24.0)), "all")
    assert not verdict.passed and verdict.clause == "relation" and f"not {prompt.relations[0].relation}" in verdict.reason
    image = two_object_scene((a.shape, b.colour), (b.shape, a.colour), 8.0)  # colours swapped between the shapes
    assert check(prompt, detect(image), "shapes").passed and not check(prompt, detect(image), "binding").passed
    held = tasks["held_out"].prompts
    assert {"a red triangle", "a blue star"} <= {p.text for p in held}
    assert all(p.held_out for p in held) and not any(p.held_out for t in TASKS if t != "held_out" for p in tasks[t].prompts)


def test_three_object_prompts_follow_the_dataset_and_grade_both_relations():
    info = dataset_info(ShapesConfig(num_train=0, num_test=0), num_test_held_out=0)
    prompts = next(t for t in build_tasks(info) if t.name == "three_objects").prompts
    # One prompt per pair of relation words, three different colours and shapes, nothing held out.
    assert sorted((p.relations[0].relation, p.relations[1].relation) for p in prompts) == sorted(product(RELATIONS, RELATIONS))
    for p in prompts:
        assert len({o.colour for o in p.objects}) == len({o.shape for o in p.objects}) == 3 and not p.held_out
        a, b, c = (describe(SceneObject(o.shape, o.colour, "medium", (0, 0), 0)) for o in p.objects)
        rel_ab, rel_cb = (r.relation for r in p.relations)
        assert p.text == f"{a} {rel_ab} {b} and {c} {rel_cb} the {b.split(' ', 1)[1]}"  # the dataset's wording
    prompt = next(p for p in prompts if [r.relation for r in p.relations] == ["left of", "above"])
    a, b, c = ((o.shape, o.colour) for o in prompt.objects)

    def scene(c_y):  # A left of B; C above B at c_y = 5, below it at c_y = 26
        placed = [(a, (6.0, 16.0)), (b, (20.0, 16.0)), (c, (20.0, c_y))]
        return render_scene([SceneObject(*o, "medium", centre, 4.5) for o, centre in placed], 32)[0]

    assert check(prompt, detect(scene(5.0)), "all").passed
    verdict = check(prompt, detect(scene(26.0)), "all")
    assert not verdict.passed and verdict.clause == "relation" and "not above" in verdict.reason


def test_fidelity_and_failure_grid_on_rendered_scenes(tmp_path):
    """ImageRecords of two renderings of one spatial prompt, one right and one with the relation reversed."""
    info = dataset_info(ShapesConfig(num_train=0, num_test=0), num_test_held_out=0)
    palette = {c: tuple(v) for c, v in info["palette"].items()}
    spatial = next(t for t in build_tasks(info) if t.name == "spatial")
    prompt = spatial.prompts[0]  # "a red circle left of a green square"
    a, b = prompt.objects
    records = []
    for seed, first_x in enumerate((8.0, 24.0)):
        path = tmp_path / f"seed{seed}.png"
        Image.fromarray(two_object_scene((a.shape, a.colour), (b.shape, b.colour), first_x)).save(path)
        records.append(ImageRecord.detect(prompt, seed, path, palette, DetectorSettings()))
    assert all(sorted(r.located) == [0, 1] for r in records)
    fidelity = evaluate_fidelity([Task("spatial", spatial.description, spatial.aspect, [prompt])], records)
    task = fidelity["tasks"]["spatial"]
    assert task["score"] == fidelity["overall"] == 0.5 and task["failed_on"] == {"count": 0, "object": 0, "relation": 1}
    assert not records[0].failed and records[1].failed
    assert f"not {prompt.relations[0].relation}" in records[1].verdicts["spatial"]["reason"]
    assert records[1].to_dict(tmp_path)["image"] == "seed1.png"

    grid = tmp_path / "failures.png"
    assert failure_grid(records, grid) == 1 and Image.open(grid).width == TILE_WIDTH
    records[1].verdicts.clear()  # nothing failed: no grid, and the old one goes
    assert failure_grid(records, grid) == 0 and not grid.exists()


@pytest.fixture(scope="module")
def user_data_model(cache_dir, tmp_path_factory):
    """The tiny model trained on a folder of a user's own (shapes images with their captions, no masks), 20% held out."""
    root = tmp_path_factory.mktemp("user")
    source = next((cache_dir / "datasets").glob("shapes-*")) / "train"
    rows = [json.loads(line) for line in (source / "metadata.jsonl").read_text().splitlines()[:300]]
    (root / "my_images" / "pics").mkdir(parents=True)
    with open(root / "my_images" / "metadata.jsonl", "w") as f:
        for k, row in enumerate(rows):
            shutil.copy(source / row["file_name"], root / "my_images" / "pics" / f"{k}.png")
            f.write(json.dumps({"file_name": f"pics/{k}.png", "caption": row["text"]}) + "\n")
    overrides = [f"data.dataset={root / 'my_images'}", "data.caption_column=caption", "data.test_fraction=0.2",
                 "train.max_steps=10", "train.validate_every=0"]
    train(tiny_config(cache_dir, *overrides), output_dir=str(root / "mine"), progress=False, device="cpu")
    return root / "mine"


def test_user_data_is_judged_by_its_own_clip_beside_real_images_and_baselines(user_data_model, tmp_path, capsys):
    out = tmp_path / "eval"
    args = ["--device", "cpu", "--model", str(user_data_model), "--captions", "6", "--seeds", "2", "--steps", "2", "--out", str(out)]
    assert main([*args, "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    real = results["real_data"]
    assert "tiny-clip" in real["judge"] and real["candidates"] == 100 and results["images"] == 2 * 6 * 2  # no caption in both
    cfg = read_run_config(find_model_dir(user_data_model))
    unet_tower = prepare_text_encoder(cfg.text_encoder, cfg.data, Path(cfg.cache_dir))  # cached by training
    assert Path(real["judge"]).is_dir() and Path(real["judge"]) != Path(unet_tower)  # the judge is not the UNet's tower
    assert [s["split"] for s in real["splits"]] == ["held-out captions", "training captions"]
    for split in real["splits"]:
        rows = split["rows"]
        assert split["captions"] == 6 and rows["generated"]["images"] == 12 and rows["real"]["images"] == 6
        assert all(in_unit_interval(row["r_precision"]) for row in rows.values())
        assert "kid_x1000" not in rows["real"] and all(np.isfinite(rows[k]["kid_x1000"]) for k in rows if k != "real")
    report = (out / "results.md").read_text()
    assert "held-out captions" in report and "| blurred real | 6 |" in report and "--masks" in report


def test_user_data_localisation_from_masks(user_data_model, tmp_path, capsys):
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:10, 4:10] = 255
    Image.fromarray(mask).save(tmp_path / "cat.png")
    Image.fromarray(255 - mask).save(tmp_path / "mat.png")
    rows = [
        {"prompt": "a cat on a mat", "seed": 0, "masks": {"cat": "cat.png", "mat": "mat.png"}},
        {"prompt": "a cat", "seed": 1, "masks": {"cat": "cat.png", "dog": "cat.png"}},  # dog: not in the prompt
    ]
    (tmp_path / "masks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval"
    args = ["--device", "cpu", "--model", str(user_data_model), "--masks", str(tmp_path / "masks.jsonl"), "--steps", "3", "--out", str(out),
            "--captions", "2", "--seeds", "1"]
    assert main([*args, "--no-progress"]) == 0
    assert "'dog' is not a word" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert not results["fidelity"]["applies"] and "shapes domain only" in results["fidelity"]["message"]
    (section,) = results["localisation"]
    assert section["counts"]["scored"] == 3 and section["counts"]["word_not_in_prompt"] == 1
    table = section["table"]["word"]
    assert table["own"]["n"] == 3 and table["swapped"]["n"] == 2
    assert table["uniform"]["pointing"] == pytest.approx(np.mean([36 / 256, 220 / 256, 36 / 256]))
    assert all(in_unit_interval(s["pointing"]) for s in table.values())
    assert "shapes domain only" in (out / "results.md").read_text() and results["real_data"]["splits"]


def test_user_masks_are_scored_even_where_the_training_data_is_gone(user_data_model, tmp_path, capsys):
    model = tmp_path / "moved" / "model"
    shutil.copytree(user_data_model / "model", model)
    config = yaml.safe_load((model / "config.yaml").read_text())
    config["data"]["dataset"] = str(tmp_path / "not-here")
    (model / "config.yaml").write_text(yaml.safe_dump(config))
    Image.new("L", (16, 16), 255).save(tmp_path / "all.png")
    (tmp_path / "masks.jsonl").write_text(json.dumps({"prompt": "a cat", "seed": 0, "masks": {"cat": "all.png"}}) + "\n")
    args = ["--device", "cpu", "--model", str(model.parent), "--masks", str(tmp_path / "masks.jsonl"), "--steps", "2", "--out", str(tmp_path / "e")]
    assert main([*args, "--no-progress"]) == 0
    assert "warning: no real-data quality" in capsys.readouterr().err
    results = json.loads((tmp_path / "e" / "results.json").read_text())
    assert "not a folder" in results["real_data"]["skipped"] and results["localisation"][0]["counts"]["scored"] == 1
    assert main(["--device", "cpu", "--model", str(model.parent), "--out", str(tmp_path / "f")]) == 2  # without masks: nothing to measure


def test_bad_masks_file_is_a_clear_error(user_data_model, tmp_path, capsys):
    (tmp_path / "masks.jsonl").write_text('{"prompt": "a cat", "seed": 0, "masks": {"cat": "missing.png"}}\n')
    args = ["--device", "cpu", "--model", str(user_data_model), "--masks", str(tmp_path / "masks.jsonl"), "--out", str(tmp_path / "e")]
    assert main(args) == 2
    assert "line 1" in capsys.readouterr().err

