"""Generate images from prompts, with each word's cross-attention map saved beside each image.

    python sample.py --model outputs/runs/cpu --prompt "a red circle left of a blue square"
    python sample.py --model outputs/runs/cpu --prompt "a red circle" --prompt "a blue star" --seeds 0-15
    python sample.py --model outputs/runs/cpu --prompts-file prompts.txt --scheduler dpm++ --steps 20
    python sample.py --model outputs/runs/cpu --prompt "a green square" --no-maps
    python sample.py --model outputs/runs/cpu --prompt "a red circle left of a blue square" --edit "a red star left of a blue square"
    python sample.py --model outputs/runs/cpu --prompt "a red circle" --reweight red=2 --seeds 0-3

Images go to outputs/samples/<run name>/ (or --out) as <prompt>_seed<N>.png, and the maps to
<prompt>_seed<N>.attn/ (grid.png, words/*.png, maps.npz, manifest.json); --html also writes report.html,
a page where hovering a word shows its map (python -m diffusion.viewer FOLDER makes one for any folder).
With --edit (prompt-to-prompt, diffusion/sampling/edit.py) each seed gives <prompt>_to_<edit>_seed<N>.png and
<prompt>_to_<edit>_seed<N>_edited.png with their maps, the edit taking the prompt's attention maps, and
pairs/<prompt>_to_<edit>_seed<N>.png, the two side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffusion.devices import add_device_argument
from diffusion.errors import UserError, exit_on_user_error
from diffusion.files import check_folder_path
from diffusion.sampling.settings import EditSettings, SamplerSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a run folder (outputs/runs/<name>) or an exported model folder")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable); \"\" samples unconditionally")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line")
    parser.add_argument("--negative-prompt", default="", help="what guidance steers away from (default: the empty prompt)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; images use seed, seed+1, ... (default 0)")
    parser.add_argument("--seeds", help="explicit seeds, e.g. 0-15 or 1,5,9 (overrides --seed/--num-images)")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    SamplerSettings.add_arguments(parser)
    EditSettings.add_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--out", help="output folder (default outputs/samples/<run name>)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing images with the same names")
    add_device_argument(parser)
    parser.add_argument("--html", action="store_true", help="also write report.html, a page to explore the maps in a browser")
    maps = parser.add_argument_group("attention maps")
    maps.add_argument("--no-maps", action="store_true", help="do not record or save attention maps")
    maps.add_argument("--maps-every", type=int, default=0, help="also save the map after every N-th step")
    maps.add_argument("--maps-timesteps", help="aggregate only timesteps in LOW-HIGH, e.g. 0-500")
    maps.add_argument("--no-layer-maps", action="store_true", help="save only the global map, not each layer's")
    maps.add_argument("--head-maps", action="store_true", help="also save each layer's map per attention head")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def check_edit_args(args: argparse.Namespace) -> EditSettings | None:
    """The edit's settings when --edit or --reweight asks for an edit (None otherwise), the flags checked."""
    edit = EditSettings.from_args(args)  # checks the edit's flags
    if not args.edit and not args.reweight:
        if args.cross_replace or args.self_replace != EditSettings().self_replace:
            raise UserError("--cross-replace and --self-replace shape an edit: add --edit \"<edited prompt>\" (or --reweight WORD=W)")
        return None
    if args.prompts_file or (args.edit and len(args.edit) != len(args.prompt)):
        raise UserError(
            f"--edit pairs with --prompt: give one --edit per --prompt (got {len(args.prompt)} --prompt, {len(args.edit)} --edit"
            f"{', and a --prompts-file' if args.prompts_file else ''})"
        )
    if "" in args.prompt or "" in args.edit:
        raise UserError("an edit needs words on both sides: the empty prompt has no attention maps to take or give")
    return edit


def check_args(args: argparse.Namespace) -> SamplerSettings:
    settings = SamplerSettings.from_args(args)  # checks the sampler flags
    if args.num_images < 1 or args.batch_size < 1:
        raise UserError("--num-images and --batch-size must be at least 1")
    if not args.prompt and not args.prompts_file:
        raise UserError('give at least one --prompt "..." or a --prompts-file')
    if args.html and args.no_maps:
        raise UserError("--html makes a page of the attention maps, which --no-maps turns off; drop one of the two")
    if args.head_maps and (args.no_maps or args.no_layer_maps):
        raise UserError("--head-maps saves each layer's maps per head, which --no-maps / --no-layer-maps turn off; drop one")
    if args.out:
        check_folder_path(args.out, "--out")
    return settings


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sampler = check_args(args)
    edit = check_edit_args(args)
    from diffusion.maps.aggregate import MapSettings
    from diffusion.sampling.generate import (
        EditJob, check_outputs_free, generate, generate_edits, parse_seeds, plan_jobs, read_prompts_file, warn_about_split_words,
    )
    from diffusion.runs import find_model_dir, run_name
    from diffusion.sampling.pipeline import TextToImagePipeline
    prompts = list(args.prompt) + (read_prompts_file(args.prompts_file) if args.prompts_file else [])
    seeds = parse_seeds(args.seeds) if args.seeds else list(range(args.seed, args.seed + args.num_images))
    window = None
    if args.maps_timesteps:
        low, _, high = args.maps_timesteps.partition("-")
        if not (low.isdigit() and high.isdigit()):
            raise UserError(f"--maps-timesteps {args.maps_timesteps!r}: write it as LOW-HIGH, e.g. 0-500")
        window = (int(low), int(high))
    map_settings = None if args.no_maps else MapSettings(
        keep_layers=not args.no_layer_maps, keep_heads=args.head_maps, snapshot_every=args.maps_every, timestep_range=window
    )

    from diffusion.devices import use_device

    device = use_device(args.device)  # before anything is loaded: a missing GPU is said at once
    model_dir = find_model_dir(args.model)
    out_dir = Path(args.out) if args.out else Path("outputs/samples") / run_name(model_dir)
    edited = args.edit or prompts  # a re-weight alone edits the prompt itself
    jobs = [EditJob(p, e, s) for p, e in zip(prompts, edited) for s in seeds] if edit else plan_jobs(prompts, seeds)
    check_outputs_free(jobs, out_dir, args.overwrite)
    pipe = TextToImagePipeline.from_run(model_dir, device=device)
    warn_about_split_words(pipe, prompts + args.edit)
    extra = {"model": str(model_dir.resolve())}
    if edit:
        written = generate_edits(
            pipe, jobs, out_dir, sampler, edit, max(1, args.batch_size // 2), args.negative_prompt, map_settings, extra, not args.no_progress
        )
    else:
        written = generate(pipe, jobs, out_dir, sampler, args.batch_size, args.negative_prompt, map_settings, extra, not args.no_progress)
    print(f"wrote {len(written)} image(s) to {out_dir}" + ("" if args.no_maps else " with their attention maps (*.attn/)"))
    if args.html:
        from diffusion.viewer.report import build_report

        print(f"wrote {build_report(out_dir)} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
