"""A live demo in the browser: type a prompt, see the image and where each of its words acted.

    pip install -e ".[demo]"
    python -m diffusion.demo --model outputs/runs/cpu                    # http://127.0.0.1:7860
    python -m diffusion.demo --model outputs/runs/cpu --host 0.0.0.0 --port 8000   # reachable from other machines

Each request samples with the pipeline and writes the images and maps exactly as sample.py does (into a
temporary folder, removed afterwards), then shows them in the viewer's page (diffusion/viewer): hover or
click a word to overlay its map, pick a layer, and slide over the denoising steps to watch the map form
as the image emerges. A second prompt, sampled with the same seed, shows what a changed word moves.
Tick "edit" and the second prompt is sampled as a prompt-to-prompt edit of the first (sample.py --edit): it
takes the first prompt's attention maps for the first steps, so the layout stays while the changed words
change; a re-weight (red=2) scales words' attention, and with no second prompt re-weights the prompt itself.
The two images then show as one pair, with the edit's settings and which word took which word's map.
Requests queue: one samples at a time, and every page waits only for its own result.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path

from diffusion.devices import add_device_argument, use_device
from diffusion.errors import UserError, exit_on_user_error
from diffusion.sampling.settings import SCHEDULER_NAMES, EditSettings, SamplerSettings, parse_word_values

PACKAGE = Path(__file__).parent
FRAMES = 20  # map and image snapshots per image for the step slider (at most; the slider's end is the final map)
EXAMPLES = [
    ["a red circle left of a blue square", "a red circle right of a blue square"],
    ["a large green triangle", "a small green triangle"],
    ["a purple star above an orange circle", "a purple square above an orange circle"],
]


def snapshot_every(steps: int) -> int:
    """Snapshot every k-th step, so that the slider has at most FRAMES frames before its final position."""
    return max(1, -(-steps // FRAMES))


def number(value, name: str, whole: bool = False) -> float | int:
    """A form field as a finite number (an int when `whole`), or a UserError naming the field."""
    try:
        result = float(value)
    except (TypeError, ValueError):
        result = math.nan
    if not math.isfinite(result) or (whole and not result.is_integer()):
        raise UserError(f"{name} must be {'a whole number' if whole else 'a number'}, got {value!r}")
    return int(result) if whole else result


def edit_settings(as_edit: bool, cross_replace, self_replace, reweight: str) -> EditSettings | None:
    """The form's edit fields as EditSettings (None unless "edit" is ticked); bad values get the CLI's messages."""
    weights = parse_word_values((reweight or "").split(), "--reweight")
    if not as_edit:
        if weights:  # said, rather than ignored: a re-weight acts only in an edit
            raise UserError('a re-weight scales words in an edit: tick "edit" (with no second prompt it re-weights the prompt itself)')
        return None
    return EditSettings(cross_replace=number(cross_replace, "--cross-replace"),
                        self_replace=number(self_replace, "--self-replace"), reweight=weights)


class Demo:
    """The loaded model and what one request does with it; the web page is `build_app`."""

    def __init__(self, model: str | Path, device: str = "auto"):
        from diffusion.runs import find_model_dir, run_name
        from diffusion.sampling.pipeline import TextToImagePipeline

        chosen = use_device(device)  # a missing GPU is said before the model is loaded
        self.model_dir = find_model_dir(model)
        self.name = run_name(self.model_dir)
        self.pipe = TextToImagePipeline.from_run(self.model_dir, device=chosen)

    def page(self, prompt: str, compare: str, seed, settings: SamplerSettings, progress: bool = False,
             edit: EditSettings | None = None) -> tuple[str, list[str]]:
        """The viewer's page (HTML) of `prompt` (and `compare`, same seed), and the notes the sampler raised.
        With `edit`, `compare` is sampled as an edit of `prompt` (an empty one: `prompt` re-weighted), one pair card."""
        from diffusion.maps.aggregate import MapSettings
        from diffusion.viewer.report import render

        seed = number(seed, "--seed", whole=True)
        if seed < 0:
            raise UserError(f"--seed must be >= 0, got {seed}")
        maps = MapSettings(snapshot_every=snapshot_every(settings.steps))
        with tempfile.TemporaryDirectory(prefix="demo-") as folder, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if edit is None:
                cards = self.prompt_cards([prompt, compare] if compare.strip() else [prompt], seed, settings, maps, Path(folder), progress)
            else:
                cards = [self.edit_card(prompt, compare, seed, settings, edit, maps, Path(folder), progress)]
        data = {"kind": "samples", "title": self.name, "folder": f"seed {seed}", "cards": cards, "smooth": False}
        notes = list(dict.fromkeys(str(w.message) for w in caught if ours(w)))
        return render(data), notes

    def prompt_cards(self, prompts: list[str], seed: int, settings: SamplerSettings, maps, folder: Path, progress: bool) -> list[dict]:
        """Each prompt sampled with `seed` into `folder`, as the viewer's cards, in prompt order."""
        from diffusion.sampling.generate import generate, plan_jobs, warn_about_split_words
        from diffusion.viewer.report import read_sample

        jobs = plan_jobs(prompts, [seed])
        jobs = list({job.file_name: job for job in jobs}.values())  # the same prompt twice is sampled once
        warn_about_split_words(self.pipe, [job.prompt for job in jobs])
        generate(self.pipe, jobs, folder, settings, batch_size=len(jobs), maps=maps,
                 extra_manifest={"model": str(self.model_dir.resolve())}, progress=progress)
        return [{"samples": [read_sample(folder / job.file_name)]} for job in jobs]

    def edit_card(self, prompt: str, edited: str, seed: int, settings: SamplerSettings, edit: EditSettings, maps,
                  folder: Path, progress: bool) -> dict:
        """`prompt` and its edit `edited` (`prompt` itself where empty: a re-weight) sampled as sample.py --edit
        does, into `folder`, as the viewer's pair card."""
        from diffusion.sampling.generate import EditJob, generate_edits, warn_about_split_words
        from diffusion.viewer.report import pair_card

        if not prompt.strip():
            raise UserError("an edit needs words on both sides: the empty prompt has no attention maps to take or give")
        if not edited.strip() and not edit.reweight:
            raise UserError("an edit needs the edited prompt as the second prompt, or a re-weight (e.g. red=2) "
                            "to re-weight the prompt itself")
        job = EditJob(prompt, edited if edited.strip() else prompt, seed)
        warn_about_split_words(self.pipe, [job.prompt, job.edited])
        generate_edits(self.pipe, [job], folder, settings, edit, batch_size=1, maps=maps,
                       extra_manifest={"model": str(self.model_dir.resolve())}, progress=progress)
        return pair_card(folder / job.source_name, folder / job.file_name)


def ours(warning: warnings.WarningMessage) -> bool:
    """A warning this project raised for the user (a truncated prompt, the empty prompt), not a library's."""
    return issubclass(warning.category, UserWarning) and Path(warning.filename).resolve().is_relative_to(PACKAGE)


def iframe(page: str) -> str:
    """The viewer's self-contained page inside the app: its script runs in its own frame."""
    return f'<iframe class="viewer" title="attention maps" srcdoc="{html.escape(page, quote=True)}"></iframe>'


CSS = """
iframe.viewer { width: 100%; height: 520px; border: 1px solid #d9dee7; border-radius: 8px; background: #f5f7fa; }
"""


def build_app(demo: Demo):
    """The Gradio page: prompt boxes and the sampler's controls, with sample.py's defaults."""
    import gradio as gr

    d, e = SamplerSettings(), EditSettings()

    # `progress` is Gradio's: it shows the sampler's progress bar (tqdm) in the page.
    def run(prompt, compare, seed, steps, guidance, scheduler, layout_guidance, as_edit, cross_replace, self_replace,
            reweight, progress=gr.Progress(track_tqdm=True)):
        try:
            settings = SamplerSettings(
                scheduler=scheduler, steps=number(steps, "--steps", whole=True), guidance=number(guidance, "--guidance"),
                layout_guidance=number(layout_guidance, "--layout-guidance"),
            )
            edit = edit_settings(as_edit, cross_replace, self_replace, reweight)
            page, notes = demo.page(prompt or "", compare or "", seed, settings, progress=True, edit=edit)
        except UserError as error:  # the CLI's message, in the page
            raise gr.Error(str(error), print_exception=False) from None
        return iframe(page), "\n".join(f"- {note}" for note in notes)

    with gr.Blocks(title=f"crossattn-diffusion: {demo.name}", analytics_enabled=False, fill_width=True) as app:
        gr.Markdown(
            f"### Where each word acted: `{demo.name}`\n"
            "Type a prompt and press Enter. Hover or click a word to see its cross-attention map; slide over the "
            "denoising steps to watch it form. A second prompt with the same seed shows what one word changes; "
            "tick **edit** to sample it as a prompt-to-prompt edit of the first, keeping the first image's layout "
            "(the two side by side, with which word took which word's map)."
        )
        with gr.Row():
            prompt = gr.Textbox(label="prompt", value=EXAMPLES[0][0], elem_id="prompt", scale=3)
            compare = gr.Textbox(label="second prompt (same seed; optional)", value=EXAMPLES[0][1], elem_id="compare", scale=3)
            button = gr.Button("Generate", variant="primary", elem_id="generate", scale=1)
        with gr.Row():
            seed = gr.Number(label="seed", value=0, precision=0, elem_id="seed")
            steps = gr.Number(label="steps", value=d.steps, precision=0, elem_id="steps")
            guidance = gr.Number(label="guidance", value=d.guidance, elem_id="guidance")
            scheduler = gr.Dropdown(list(SCHEDULER_NAMES), label="sampler", value=d.scheduler, elem_id="scheduler")
            layout = gr.Number(label="layout guidance (0 = off)", value=d.layout_guidance, elem_id="layout-guidance")
        with gr.Row():
            as_edit = gr.Checkbox(label="edit: the second prompt is an edit of the first (prompt-to-prompt)",
                                  value=False, elem_id="as-edit", scale=2)
            cross = gr.Number(label="cross-replace (fraction of the steps taking the first's word maps)",
                              value=e.cross_replace, elem_id="cross-replace")
            self_ = gr.Number(label="self-replace (fraction taking its self-attention)", value=e.self_replace, elem_id="self-replace")
            reweight = gr.Textbox(label="re-weight (e.g. red=2 circle=0.5; no second prompt: the prompt re-weighted)",
                                  elem_id="reweight", scale=2)
        notes = gr.Markdown(elem_id="notes")
        view = gr.HTML(elem_id="view")
        gr.Examples(EXAMPLES, [prompt, compare])
        inputs = [prompt, compare, seed, steps, guidance, scheduler, layout, as_edit, cross, self_, reweight]
        for trigger in (button.click, prompt.submit, compare.submit, reweight.submit):
            trigger(run, inputs, [view, notes], concurrency_id="sample")
    # One sampling at a time (it takes every core); the rest wait in the queue, each page for its own.
    return app.queue(default_concurrency_limit=1)


def launch(app, host: str, port: int | None, block: bool = True) -> str:
    """Serve the app (fonts from the system, nothing fetched from elsewhere); returns its local address."""
    import gradio as gr

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    try:
        _, url, _ = app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True,
                               theme=theme, css=CSS, footer_links=[])
    except OSError as error:
        raise UserError(f"cannot serve on {host}:{port} ({error}); pick another --port") from None
    print(f"demo running at {url} (Ctrl-C stops it)", flush=True)
    if block:
        app.block_thread()
    return url


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusion.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder (outputs/runs/<name>) or an exported model folder")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, help="port (default: the first free one from 7860)")
    add_device_argument(parser)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise UserError('the demo needs Gradio: pip install -e ".[demo]"') from None
    launch(build_app(Demo(args.model, args.device)), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
