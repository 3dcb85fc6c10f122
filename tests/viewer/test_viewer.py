"""The attention-map viewer: the page's data, bad folders, and the page itself in a real browser."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion.errors import UserError
from diffusion.maps.format import write_maps
from diffusion.sampling.settings import EditSettings
from diffusion.viewer.report import DATA_PLACEHOLDER, build_report, collect, main, pair_card, render

from browser import assert_shows, canvas_pixels, launch_chromium, shown_map
from conftest import ROOT

LAYERS = {"down.1.0.cross_attn": 4, "up.1.0.cross_attn": 8}


def write_sample(folder: Path, prompt: str, seed: int = 0, size: int = 8, snapshots=(), **manifest_changes) -> Path:
    """A sample as the sampler writes it (image, manifest, maps), with random maps summing to one per pixel."""
    rng = np.random.default_rng(seed)
    words = prompt.split()
    tokens = ["<|startoftext|>", *(w + "</w>" for w in words), "<|endoftext|>"]
    name = f"{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')}_seed{seed}"  # as map_export.slug
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}.png")

    def token_maps():
        maps = rng.random((len(tokens), size, size), dtype=np.float32) ** 4
        return maps / maps.sum(0)

    layers = {f"layer/{layer}": token_maps() for layer in LAYERS}
    arrays = {"global": np.mean(list(layers.values()), axis=0), **layers}
    arrays["words"] = arrays["global"][1:-1]
    arrays.update({f"step/{i}": token_maps() for i in snapshots})
    manifest = {
        "image": f"{name}.png", "prompt": prompt, "tokens": tokens,
        "word_of_token": [None, *range(len(words)), None], "words": words,
        "word_files": [f"{i:02d}_{w}.png" for i, w in enumerate(words)], "start_token": 0,
        "end_token": len(tokens) - 1, "num_padding_tokens": 3, "dropped_words": "", "layers": LAYERS,
        "layers_saved": sorted(LAYERS), "snapshot_steps": list(snapshots), "timesteps_aggregated": [999, 500, 1],
        "aggregation": {}, "seed": seed, "scheduler": "ddim", "steps": 3, "guidance_scale": 3.0,
    }
    attn = folder / f"{name}.attn"
    write_maps(attn, arrays, manifest)
    if manifest_changes:  # a manifest as another version of the project (or a broken one) wrote it
        written = json.loads((attn / "manifest.json").read_text())
        (attn / "manifest.json").write_text(json.dumps({**written, **manifest_changes}))
    return folder / f"{name}.png"


def page_data(html: str) -> dict:
    start = html.index("const DATA = ") + len("const DATA = ")
    return json.loads(html[start : html.index(";\n", start)])


def floats(text: str, shape) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape)


# --- The page's data ------------------------------------------------------------------------------


def test_report_is_one_self_contained_page_holding_the_saved_maps(tmp_path):
    image = write_sample(tmp_path, "a red circle", snapshots=(0, 2))
    write_sample(tmp_path, "a blue square", seed=1)
    path = build_report(tmp_path)
    assert path == tmp_path / "report.html"
    html = path.read_text()
    assert "://" not in html and DATA_PLACEHOLDER not in html  # no network, no CDN: everything inline
    data = page_data(html)
    assert data["kind"] == "samples" and len(data["cards"]) == 2
    record = next(c["samples"][0] for c in data["cards"] if c["samples"][0]["prompt"] == "a red circle")
    assert record["image"] == "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    assert record["words"] == ["a", "red", "circle"] and record["snapshot_steps"] == [0, 2]
    saved = np.load(image.with_suffix(".attn") / "maps.npz")
    for key in ["global", "words", "step/2", "layer/up.1.0.cross_attn"]:
        np.testing.assert_array_equal(floats(record["maps"][key], saved[key].shape), saved[key])


def test_a_prompt_cannot_break_out_of_the_page(tmp_path):
    write_sample(tmp_path, "a </script><b>x</b> circle")
    html = build_report(tmp_path, out=tmp_path / "page.html", smooth=True).read_text()
    assert html.count("</script>") == 1  # only the template's own
    data = page_data(html)
    assert data["cards"][0]["samples"][0]["prompt"] == "a </script><b>x</b> circle" and data["smooth"] is True


def test_images_without_maps_are_listed_beside_those_with_them(tmp_path):
    write_sample(tmp_path, "a red circle")
    Image.new("RGB", (8, 8)).save(tmp_path / "unconditional_seed0.png")
    cards = collect(tmp_path)["cards"]
    assert [c["samples"][0]["maps"] is None for c in cards] == [False, True]


def test_a_run_folder_gives_one_card_per_validation_prompt_over_training_steps(tmp_path):
    run = tmp_path / "run"
    for step in (20, 10, 30):
        folder = run / "validation" / f"step_{step:06d}"
        write_sample(folder, "a red circle", training_step=step)
        write_sample(folder, "a blue square left of a green star", training_step=step)
        Image.new("RGB", (16, 8)).save(run / "validation" / f"step_{step:06d}.png")  # train.py's grid
    for folder in (run, run / "validation"):
        data = collect(folder)
        assert data["kind"] == "training" and data["title"] == "run" and len(data["cards"]) == 2
        for card in data["cards"]:
            assert [s["settings"]["training_step"] for s in card["samples"]] == [10, 20, 30]
    assert build_report(run).parent == run


def edit_record(source: Path, source_prompt: str) -> dict:
    """The `edit` of an edited image's manifest, as sample.py --edit writes it."""
    return {"role": "edited", "source_image": source.name, "source_prompt": source_prompt, "alignment": ["a <- a"],
            "cross_replace": 0.8, "self_replace": 0.4, "cross_replace_words": {}, "reweight": {"red": 2.0}}


def test_an_edit_and_its_source_make_one_pair_card(tmp_path):
    source = write_sample(tmp_path, "a red circle")
    star = write_sample(tmp_path, "a red star", edit=edit_record(source, "a red circle"))
    big = write_sample(tmp_path, "a big red circle", edit=edit_record(source, "a red circle"))
    lonely = write_sample(tmp_path, "a blue square", edit={"role": "source", "edited_image": "gone.png", "edited_prompt": "x"})
    orphan = write_sample(tmp_path, "a green star", edit=edit_record(tmp_path / "gone_seed0.png", "gone"))
    cards = collect(tmp_path)["cards"]
    # In file order, each edit where it stands; the source in both of its pairs and never alone.
    assert [[r["file"] for r in c.get("pair") or c["samples"]] for c in cards] == [
        [source.name, big.name], [lonely.name], [orphan.name], [source.name, star.name],
    ]
    assert cards[0] == pair_card(source, big) and cards[0]["edit"] == edit_record(source, "a red circle")
    assert all(r["heads"] == {} for c in cards for r in c.get("pair") or c["samples"])  # no head maps in these files


# --- Bad folders: say what is wrong and how to fix it ------------------------------------------------


def test_a_folder_without_maps_says_so(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a-red-circle_seed0.png")
    with pytest.raises(UserError, match="--no-maps") as error:
        build_report(tmp_path)
    assert str(tmp_path) in str(error.value) and "sample.py" in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        build_report(tmp_path / "nowhere")
    old_run = tmp_path / "run"  # an older train.py saved only grids
    (old_run / "validation").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(old_run / "validation" / "step_000040.png")
    with pytest.raises(UserError, match="holds no attention maps"):
        build_report(old_run)


@pytest.mark.parametrize("version", [0, 2, None])
def test_other_manifest_versions_are_refused(tmp_path, version):
    write_sample(tmp_path, "a red circle", version=version)
    with pytest.raises(UserError, match=f"version {version}, but this version of the project reads version 1"):
        build_report(tmp_path)


def test_missing_files_are_named(tmp_path):
    image = write_sample(tmp_path, "a red circle", snapshots=(0,))
    attn = image.with_suffix(".attn")
    maps = dict(np.load(attn / "maps.npz"))
    del maps["step/0"]
    np.savez(attn / "maps.npz", **maps)
    with pytest.raises(UserError, match=r"maps\.npz lacks the array\(s\) step/0"):
        build_report(tmp_path)
    (attn / "maps.npz").unlink()
    with pytest.raises(UserError, match=re.escape(f"{attn / 'maps.npz'} is missing")):
        build_report(tmp_path)
    (attn / "manifest.json").unlink()
    with pytest.raises(UserError, match=re.escape(f"{attn / 'manifest.json'} is missing")):
        build_report(tmp_path)
    image.unlink()
    with pytest.raises(UserError, match="has no image beside it"):
        build_report(tmp_path)


def test_cli_prints_the_error_and_exits_2(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} holds no attention maps")
    write_sample(tmp_path, "a red circle")
    result = subprocess.run(
        [sys.executable, "-m", "diffusion.viewer", str(tmp_path), "--out", str(tmp_path / "x.html")],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0 and (tmp_path / "x.html").is_file(), result.stderr


def test_sample_html_needs_maps():
    result = subprocess.run(
        [sys.executable, "sample.py", "--model", "x", "--prompt", "a red circle", "--html", "--no-maps"],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2 and "--no-maps" in result.stderr


# --- The page in a real browser ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def samples(finished_run, tmp_path_factory):
    """Samples of the tiny trained model, with a map after every step, and sample.py's report.html."""
    out = tmp_path_factory.mktemp("viewer") / "samples"
    result = subprocess.run(
        [
            sys.executable, "sample.py", "--device", "cpu", "--model", str(finished_run), "--prompt", "a red circle left of a blue square",
            "--prompt", "a zebra circle", "--seeds", "0-1", "--maps-every", "1", "--steps", "3", "--out", str(out),
            "--html", "--no-progress",
        ],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").is_file()
    return out


EDIT_PROMPT, EDITED = "a red circle left of a blue square", "a red star left of a blue square"


@pytest.fixture(scope="module")
def edit_samples(finished_run, tmp_path_factory):
    """A prompt and its edit sampled by sample.py --edit with each head's maps, and its report.html."""
    out = tmp_path_factory.mktemp("viewer") / "edit"
    result = subprocess.run(
        [
            sys.executable, "sample.py", "--device", "cpu", "--model", str(finished_run), "--prompt", EDIT_PROMPT,
            "--edit", EDITED, "--reweight", "red=2", "--seeds", "0", "--steps", "2", "--head-maps", "--out", str(out),
            "--html", "--no-progress",
        ],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return out


def attn_of(folder: Path, name: str) -> tuple[dict, dict]:
    attn = folder / f"{name}.attn"
    return json.loads((attn / "manifest.json").read_text()), np.load(attn / "maps.npz")


def test_sample_py_edit_gives_one_pair_card_with_both_records_and_the_edit(edit_samples):
    data = collect(edit_samples)
    assert len(data["cards"]) == 1
    card = data["cards"][0]
    source, edited = card["pair"]
    assert (source["prompt"], edited["prompt"]) == (EDIT_PROMPT, EDITED)
    manifest, maps = attn_of(edit_samples, edited["name"])
    assert card["edit"] == manifest["edit"] and card["edit"]["reweight"] == {"red": 2.0}
    assert "star <- circle" in card["edit"]["alignment"] and card["edit"]["source_image"] == source["file"]
    assert edited["heads"] == manifest["heads_saved"] and manifest["heads_saved"]
    layer, heads = next(iter(manifest["heads_saved"].items()))
    key = f"layer/{layer}/head{heads - 1}"
    np.testing.assert_array_equal(floats(edited["maps"][key], maps[key].shape), maps[key])


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


@pytest.fixture
def open_page(browser):
    """Open a report; afterwards check it raised no error and asked for nothing but its own file."""
    pages = []

    def open_(path: Path):
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.problems = []
        page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
        page.on("console", lambda m: page.problems.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("request", lambda r: None if r.url.startswith(("file:", "data:")) else page.problems.append(r.url))
        page.goto(path.resolve().as_uri())
        pages.append(page)
        return page

    yield open_
    for page in pages:
        assert page.problems == []
        page.close()


def assert_picture(card, png: Path, step: str) -> None:
    """The card's picture is `png`, each of its pixels drawn as a square block (nearest neighbour)."""
    picture = card.locator("canvas.picture")
    assert picture.get_attribute("data-step") == step
    expected = np.asarray(Image.open(png).convert("RGB"))
    block = 256 // expected.shape[0]
    np.testing.assert_array_equal(canvas_pixels(picture)[block // 2 :: block, block // 2 :: block], expected)


def word_map(maps, key: str, word_of_token: list, word: int) -> np.ndarray:
    return maps[key][[t for t, w in enumerate(word_of_token) if w == word]].mean(0)


def test_hovering_a_word_overlays_its_saved_map(samples, open_page, tmp_path):
    name = "a-red-circle-left-of-a-blue-square_seed0"
    manifest = json.loads((samples / f"{name}.attn" / "manifest.json").read_text())
    maps = np.load(samples / f"{name}.attn" / "maps.npz")
    page = open_page(samples / "report.html")
    card = page.locator(f'section.card[data-name="{name}"]')
    assert card.locator("button.chip[data-word]").all_inner_texts() == manifest["words"]
    assert not card.locator("canvas.overlay").is_visible()  # nothing until a word is chosen

    shown = []
    for i, word in enumerate(manifest["words"]):
        card.locator(f'button.chip[data-word="{i}"]').hover()
        assert_shows(card, maps["words"][i])
        caption = card.locator(".caption").inner_text()
        assert f'"{word}"' in caption and f"peak {maps['words'][i].max():.3f}" in caption
        shown.append(shown_map(card))
    assert len({m.tobytes() for m in shown}) > 1  # words differ on the page as in the arrays
    card.locator(f'button.chip[data-token="{manifest["end_token"]}"]').hover()
    assert_shows(card, maps["global"][manifest["end_token"]])

    # One layer's map: a word's is the mean of its tokens' maps in that layer.
    layer = manifest["layers_saved"][0]
    card.locator("select.layer").select_option(layer)
    card.locator('button.chip[data-word="1"]').hover()
    assert_shows(card, word_map(maps, f"layer/{layer}", manifest["word_of_token"], 1))

    # Denoising steps: the slider shows the map as it stood after each step; play starts at the first.
    assert manifest["snapshot_steps"] == [0, 1, 2]
    card.locator('button.chip[data-word="1"]').click()  # pinned: stays shown when the mouse moves on
    # The picture follows the slider: the denoised estimate after that step, then the image itself.
    card.locator("input.step").evaluate("e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
    assert card.locator("select.layer").is_disabled()
    assert_shows(card, word_map(maps, "step/0", manifest["word_of_token"], 1))
    assert_picture(card, samples / f"{name}.attn" / manifest["snapshot_images"][0], step="0")
    card.locator("input.step").evaluate("e => { e.value = 3; e.dispatchEvent(new Event('input')); }")
    assert_shows(card, word_map(maps, f"layer/{layer}", manifest["word_of_token"], 1))
    assert_picture(card, samples / f"{name}.png", step="final")

    # The grid of all words and a screenshot of the whole (look at it when changing the page).
    card.locator(".gridToggle").click()
    assert card.locator(".grid .tile").count() == len(manifest["words"])
    page.screenshot(path=str(tmp_path / "viewer.png"))
    card.locator(".row button").first.click()  # play the denoising steps
    assert "after step 1 of 3" in card.locator(".row span").first.inner_text()
    print(f"screenshot: {tmp_path / 'viewer.png'}")


def test_a_word_split_into_tokens_shows_their_mean(samples, open_page):
    name = "a-zebra-circle_seed1"
    manifest = json.loads((samples / f"{name}.attn" / "manifest.json").read_text())
    maps = np.load(samples / f"{name}.attn" / "maps.npz")
    zebra = manifest["words"].index("zebra")
    assert manifest["word_of_token"].count(zebra) > 1
    page = open_page(samples / "report.html")
    card = page.locator(f'section.card[data-name="{name}"]')
    card.locator(f'button.chip[data-word="{zebra}"]').click()
    assert_shows(card, maps["words"][zebra])
    layer = manifest["layers_saved"][-1]
    card.locator("select.layer").select_option(layer)
    assert_shows(card, word_map(maps, f"layer/{layer}", manifest["word_of_token"], zebra))


def test_a_run_page_steps_through_training(samples, open_page, tmp_path):
    """Two samples standing in for one validation prompt at training steps 10 and 20."""
    name = "a-red-circle-left-of-a-blue-square_seed0"
    run = tmp_path / "run"
    for step, seed in ((10, 0), (20, 1)):
        folder = run / "validation" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        source = samples / f"{name[:-1]}{seed}"
        shutil.copy(source.with_suffix(".png"), folder / f"{name}.png")
        shutil.copytree(source.with_suffix(".attn"), folder / f"{name}.attn")
        manifest = json.loads((folder / f"{name}.attn" / "manifest.json").read_text())
        (folder / f"{name}.attn" / "manifest.json").write_text(json.dumps({**manifest, "training_step": step}))
    page = open_page(build_report(run))
    card = page.locator("section.card")
    assert card.count() == 1 and "step 20" in card.locator(".trainingSteps span").inner_text()
    card.locator('button.chip[data-word="6"]').click()
    for step, seed in ((10, 0), (20, 1)):
        card.locator("input.training").evaluate(f"e => {{ e.value = {seed}; e.dispatchEvent(new Event('input')); }}")
        assert f"step {step}" in card.locator(".trainingSteps span").inner_text()
        assert_shows(card, np.load(samples / f"{name[:-1]}{seed}.attn" / "maps.npz")["words"][6])


def test_the_page_names_a_map_it_lacks_instead_of_showing_nothing(open_page, tmp_path):
    """build_report refuses such folders; a page edited by hand (or cut short) still says what is missing."""
    write_sample(tmp_path, "a red circle")
    data = collect(tmp_path)
    del data["cards"][0]["samples"][0]["maps"]["layer/up.1.0.cross_attn"]
    (tmp_path / "report.html").write_text(render(data))
    card = open_page(tmp_path / "report.html").locator("section.card")
    card.locator("select.layer").select_option("up.1.0.cross_attn")
    card.locator('button.chip[data-word="1"]').hover()
    caption = card.locator(".caption").inner_text()
    assert "Missing map" in caption and str(tmp_path / "a-red-circle_seed0.attn" / "maps.npz") in caption
    assert "layer/up.1.0.cross_attn" in caption and not card.locator("canvas.overlay").is_visible()


def test_an_edit_page_shows_the_pair_and_each_heads_saved_map(edit_samples, open_page, tmp_path):
    page = open_page(edit_samples / "report.html")
    card = page.locator("section.card.pair")
    assert page.locator("section.card").count() == 1
    header = card.locator(".editHead").inner_text()
    assert f"edit: {EDIT_PROMPT} \u2192 {EDITED}" in header and "star \u2190 circle" in header
    edit = EditSettings()  # sample.py's defaults
    assert f"cross-replace {edit.cross_replace}" in header and f"self-replace {edit.self_replace}" in header
    assert '"red" \u00d72' in header
    names = [p.stem for p in sorted(edit_samples.glob("*.png"))]  # the source, then its edit
    panels = card.locator(".panel")
    for k, name in enumerate(names):  # both images side by side, each with its own words
        manifest, _ = attn_of(edit_samples, name)
        assert_picture(panels.nth(k), edit_samples / f"{name}.png", step="final")
        assert panels.nth(k).locator("button.chip[data-word]").all_inner_texts() == manifest["words"]

    # The head menu: off for the global map, then a layer's heads; head k shows layer/<name>/head<k>.
    panel = panels.nth(1)
    manifest, maps = attn_of(edit_samples, names[1])
    heads = panel.locator("select.head")
    assert heads.is_disabled() and "choose a layer" in heads.get_attribute("title")
    layer, n = max(manifest["heads_saved"].items(), key=lambda item: item[1])
    panel.locator("select.layer").select_option(layer)
    assert not heads.is_disabled() and heads.locator("option").all_inner_texts() == ["mean of heads", *(f"head {k}" for k in range(n))]
    star = manifest["words"].index("star")
    panel.locator(f'button.chip[data-word="{star}"]').click()
    for k in range(n):
        heads.select_option(str(k))
        assert_shows(panel, word_map(maps, f"layer/{layer}/head{k}", manifest["word_of_token"], star))
        assert f"{layer} head {k}" in panel.locator(".caption").inner_text()
    heads.select_option("mean")
    assert_shows(panel, word_map(maps, f"layer/{layer}", manifest["word_of_token"], star))
    # The other image's hover is its own: nothing shown there until one of its words is chosen.
    assert not panels.nth(0).locator("canvas.overlay").is_visible()
    page.screenshot(path=str(tmp_path / "edit.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'edit.png'}")


def test_files_without_head_maps_keep_the_head_menu_off_and_say_why(open_page, tmp_path):
    write_sample(tmp_path, "a red circle")
    card = open_page(build_report(tmp_path)).locator("section.card")
    card.locator("select.layer").select_option("up.1.0.cross_attn")
    heads = card.locator("select.head")
    assert heads.is_disabled() and "--head-maps" in heads.get_attribute("title")
    card.locator('button.chip[data-word="1"]').hover()
    assert "Missing" not in card.locator(".caption").inner_text() and card.locator("canvas.overlay").is_visible()
