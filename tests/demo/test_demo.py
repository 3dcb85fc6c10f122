"""The live demo: each request gives sample.py's images and maps in the viewer's page (an edit as sample.py --edit's
pair), bad input gets the CLI's message, and in a real browser hovering a word overlays the map sample.py saved for
the same prompt and seed."""

import json
import queue
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from browser import assert_shows, canvas_pixels, launch_chromium
from conftest import ROOT
from diffusion.errors import UserError
from diffusion.sampling.settings import EditSettings, SamplerSettings

pytest.importorskip("gradio", reason='the demo needs gradio (pip install -e ".[demo]")')
from diffusion.demo import Demo, edit_settings, snapshot_every  # noqa: E402

PROMPT, COMPARE, SEED, STEPS = "a red circle left of a blue square", "a red circle right of a blue square", 3, 4
EDITED = "a red star left of a blue square"  # sampled as an edit of PROMPT, with red re-weighted by 2


@pytest.fixture(scope="module")
def saved(finished_run, tmp_path_factory):
    """What sample.py writes for the demo's two prompts, seed and snapshot steps."""
    out = tmp_path_factory.mktemp("demo") / "samples"
    command = [
        sys.executable, "sample.py", "--device", "cpu", "--model", str(finished_run), "--prompt", PROMPT, "--prompt", COMPARE,
        "--seeds", str(SEED), "--steps", str(STEPS), "--maps-every", str(snapshot_every(STEPS)), "--out", str(out),
        "--no-progress",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def saved_edit(finished_run, tmp_path_factory):
    """What sample.py --edit writes for PROMPT -> EDITED with the demo's seed and snapshot steps."""
    out = tmp_path_factory.mktemp("demo") / "edit"
    command = [
        sys.executable, "sample.py", "--device", "cpu", "--model", str(finished_run), "--prompt", PROMPT, "--edit", EDITED,
        "--reweight", "red=2", "--seeds", str(SEED), "--steps", str(STEPS), "--maps-every", str(snapshot_every(STEPS)),
        "--out", str(out), "--no-progress",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out


def saved_sample(saved, prompt, tail=f"_seed{SEED}"):
    attn = next(saved.glob(f"{re.sub(r'[^a-z0-9]+', '-', prompt)}{tail}.attn"))
    return attn, json.loads((attn / "manifest.json").read_text()), np.load(attn / "maps.npz")


def edit_tails(edited: str) -> tuple[str, str]:
    """The source's and the edited image's names after the prompt's (generate.EditJob)."""
    stem = f"_to_{re.sub(r'[^a-z0-9]+', '-', edited)}_seed{SEED}"
    return stem, f"{stem}_edited"


def page_data(page: str) -> dict:
    start = page.index("const DATA = ") + len("const DATA = ")
    return json.loads(page[start : page.index(";\n", start)])


@pytest.fixture(scope="module")
def demo(finished_run):
    return Demo(finished_run, device="cpu")


def test_a_request_gives_sample_pys_images_and_maps_in_the_viewers_page(demo, saved):
    page, notes = demo.page(PROMPT, COMPARE, SEED, SamplerSettings(steps=STEPS))
    data = page_data(page)
    assert notes == [] and [card["samples"][0]["prompt"] for card in data["cards"]] == [PROMPT, COMPARE]
    for card in data["cards"]:
        record = card["samples"][0]
        attn, manifest, maps = saved_sample(saved, record["prompt"])
        assert record["words"] == manifest["words"] and record["snapshot_steps"] == manifest["snapshot_steps"] == [0, 1, 2, 3]
        for key in ("words", "global", "step/0"):
            shown = np.frombuffer(__import__("base64").b64decode(record["maps"][key]), dtype="<f4")
            np.testing.assert_allclose(shown.reshape(maps[key].shape), maps[key], atol=1e-5)
        assert len(record["snapshot_images"]) == 4


def test_an_edit_gives_sample_pys_edit_pair_as_one_card(demo, saved_edit):
    edit = EditSettings(reweight=(("red", 2.0),))
    page, notes = demo.page(PROMPT, EDITED, SEED, SamplerSettings(steps=STEPS), edit=edit)
    (card,) = page_data(page)["cards"]
    assert notes == [] and [record["prompt"] for record in card["pair"]] == [PROMPT, EDITED]
    for record, tail in zip(card["pair"], edit_tails(EDITED)):
        attn, manifest, maps = saved_sample(saved_edit, PROMPT, tail)
        assert record["file"] == manifest["image"] and record["words"] == manifest["words"]
        for key in ("words", "global", "step/0", f"layer/{manifest['layers_saved'][0]}"):
            shown = np.frombuffer(__import__("base64").b64decode(record["maps"][key]), dtype="<f4")
            np.testing.assert_allclose(shown.reshape(maps[key].shape), maps[key], atol=1e-5)
    assert card["edit"] == manifest["edit"] and card["edit"]["reweight"] == {"red": 2.0}
    assert "star <- circle" in card["edit"]["alignment"]


def test_an_edit_without_a_second_prompt_re_weights_the_prompt(demo):
    page, _ = demo.page(PROMPT, "", 0, SamplerSettings(steps=1), edit=EditSettings(reweight=(("blue", 0.5),)))
    source, edited = page_data(page)["cards"][0]["pair"]
    assert source["prompt"] == edited["prompt"] == PROMPT and edited["file"].endswith("_reweighted_seed0_edited.png")


@pytest.mark.parametrize("form, message", [
    ((True, 1.5, 0.4, ""), "--cross-replace 1.5: a fraction of the sampling steps must lie in [0, 1]"),
    ((True, 0.8, -0.1, ""), "--self-replace -0.1: a fraction of the sampling steps must lie in [0, 1]"),
    ((True, 0.8, 0.4, "red"), "--reweight 'red': write WORD=NUMBER"),
    ((False, 0.8, 0.4, "red=2"), 'tick "edit"'),
])
def test_bad_edit_fields_get_the_clis_message(form, message):
    with pytest.raises(UserError, match=re.escape(message)):
        edit_settings(*form)


def test_an_edit_the_prompts_cannot_take_is_refused(demo):
    with pytest.raises(UserError, match="has no word 'green'"):
        demo.page(PROMPT, EDITED, 0, SamplerSettings(steps=1), edit=EditSettings(reweight=(("green", 2.0),)))
    with pytest.raises(UserError, match="an edit needs the edited prompt"):
        demo.page(PROMPT, " ", 0, SamplerSettings(steps=1), edit=EditSettings())
    with pytest.raises(UserError, match="the empty prompt has no attention maps"):
        demo.page("", EDITED, 0, SamplerSettings(steps=1), edit=EditSettings())


def test_the_sampler_notes_reach_the_page(demo):
    long_prompt = " ".join(["a red circle left of a blue square"] * 8)
    page, notes = demo.page(long_prompt, "", 0, SamplerSettings(steps=1))
    assert len(notes) == 1 and "truncated" in notes[0] and "dropped" in notes[0].lower()
    assert page_data(page)["cards"][0]["samples"][0]["dropped_words"]
    page, notes = demo.page("", "", 0, SamplerSettings(steps=1))
    assert notes == ["an empty prompt samples the unconditional model; it has no words, so no word maps"]
    assert page_data(page)["cards"][0]["samples"][0]["maps"] is None
    page, notes = demo.page("a zebra circle", "", 0, SamplerSettings(steps=1))  # a word the captions never hold
    assert len(notes) == 1 and "words split into several tokens" in notes[0] and "'zebra' (" in notes[0]


@pytest.mark.parametrize("seed", [-1, 1.5, None, "x"])
def test_a_bad_seed_is_named(demo, seed):
    with pytest.raises(UserError, match="--seed must be"):
        demo.page(PROMPT, "", seed, SamplerSettings(steps=1))


def test_a_folder_that_is_not_a_model_is_refused_before_serving(tmp_path):
    result = subprocess.run([sys.executable, "-m", "diffusion.demo", "--model", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"error: {tmp_path} is not a run folder")
    assert "Traceback" not in result.stderr


# --- The app in a real browser -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(finished_run):
    """`python -m diffusion.demo` on the tiny model, on a free local port; its printed address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "diffusion.demo", "--device", "cpu", "--model", str(finished_run), "--port", str(free_port())],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=120)
            if line.startswith("demo running at "):
                break
        url = line.split()[3]
        assert url.startswith("http://127.0.0.1:")  # bound to this machine unless asked otherwise
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with launch_chromium() as chromium:
        yield chromium


def open_app(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(f"page error: {error}"))
    local = (url.rstrip("/"), "data:", "blob:", "about:")
    page.on("request", lambda r: None if r.url.startswith(local) else page.problems.append(r.url))
    page.goto(url)
    return page


def fill(page, field: str, value) -> None:
    page.locator(f"#{field} textarea, #{field} input").first.fill(str(value))


def test_typing_a_prompt_shows_its_image_and_each_words_saved_map(browser, app_url, saved, tmp_path):
    page = open_app(browser, app_url)
    fill(page, "prompt", PROMPT)
    fill(page, "compare", COMPARE)
    fill(page, "seed", SEED)
    fill(page, "steps", STEPS)
    page.locator("#prompt textarea").press("Enter")
    frame = page.frame_locator("#view iframe")
    frame.locator("section.card").nth(1).wait_for(timeout=60_000)
    for index, prompt in enumerate([PROMPT, COMPARE]):  # side by side, the same seed
        attn, manifest, maps = saved_sample(saved, prompt)
        card = frame.locator("section.card").nth(index)
        assert card.locator("button.chip[data-word]").all_inner_texts() == manifest["words"]
        for i in range(len(manifest["words"])):
            card.locator(f'button.chip[data-word="{i}"]').hover()
            assert_shows(card, maps["words"][i])
    # The step slider replays the map forming, over the denoised image at that step.
    card.locator('button.chip[data-word="1"]').click()
    card.locator("input.step").evaluate("e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
    assert_shows(card, maps["step/0"][[t for t, w in enumerate(manifest["word_of_token"]) if w == 1]].mean(0))
    step_image = np.asarray(Image.open(attn / manifest["snapshot_images"][0]).convert("RGB"))
    block = 256 // step_image.shape[0]
    np.testing.assert_array_equal(canvas_pixels(card.locator("canvas.picture"))[block // 2 :: block, block // 2 :: block], step_image)
    page.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
    print(f"screenshot: {tmp_path / 'demo.png'}")
    assert page.problems == []


def test_bad_input_gets_the_clis_message_and_requests_queue(browser, app_url):
    first, second = open_app(browser, app_url), open_app(browser, app_url)
    fill(first, "steps", 0)
    first.locator("#generate").click()
    first.get_by_text("--steps must be at least 1, got 0").wait_for(timeout=30_000)
    assert "Traceback" not in first.content()
    # Two pages at once: each gets its own result, one after the other.
    for page, prompt in ((first, "a blue square"), (second, "a green star")):
        fill(page, "prompt", prompt)
        fill(page, "compare", "")
        fill(page, "steps", 20)
        page.locator("#generate").click()
    for page, prompt in ((first, "a blue square"), (second, "a green star")):
        card = page.frame_locator("#view iframe").locator("section.card")
        card.first.wait_for(timeout=60_000)
        assert card.count() == 1 and card.locator("button.chip[data-word]").all_inner_texts() == prompt.split()
        assert page.problems == []


def test_an_edit_shows_the_pair_with_its_header(browser, app_url, saved_edit):
    page = open_app(browser, app_url)
    page.locator("#as-edit input").check()
    fill(page, "cross-replace", 1.5)
    page.locator("#generate").click()
    page.get_by_text("--cross-replace 1.5: a fraction of the sampling steps must lie in [0, 1]").wait_for(timeout=30_000)
    fill(page, "cross-replace", EditSettings().cross_replace)  # sample.py's default, as saved_edit sampled it
    for field, value in (("prompt", PROMPT), ("compare", EDITED), ("seed", SEED), ("steps", STEPS), ("reweight", "red=2")):
        fill(page, field, value)
    page.locator("#generate").click()
    card = page.frame_locator("#view iframe").locator("section.card.pair")
    card.wait_for(timeout=60_000)
    header = card.locator(".editHead").inner_text()
    assert f"edit: {PROMPT} \u2192 {EDITED}" in header and "star \u2190 circle" in header and '"red" \u00d72' in header
    panels = card.locator(".panel")
    assert panels.count() == 2 and card.locator("canvas.picture").count() == 2
    for k, tail in enumerate(edit_tails(EDITED)):  # each image with its own words and saved maps
        attn, manifest, maps = saved_sample(saved_edit, PROMPT, tail)
        assert panels.nth(k).locator("button.chip[data-word]").all_inner_texts() == manifest["words"]
        panels.nth(k).locator('button.chip[data-word="2"]').hover()
        assert_shows(panels.nth(k), maps["words"][2])
    assert page.problems == []
