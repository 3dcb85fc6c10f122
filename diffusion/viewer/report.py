"""One self-contained HTML page of a samples folder: hover a word, see where it acted.

    python -m diffusion.viewer outputs/samples/cpu                 # -> outputs/samples/cpu/report.html
    python -m diffusion.viewer outputs/runs/cpu --out maps.html    # validation maps over training steps
    python -m diffusion.viewer outputs/samples/cpu --smooth        # start with smooth (bilinear) upscaling

It reads what the sampler writes (diffusion/maps/format.py): <name>.png beside <name>.attn/ holding
manifest.json and maps.npz. A run folder (or its validation/) holds validation/step_NNNNNN/<name>.png + .attn/,
one folder per validation; its page gets a slider over training steps per validation prompt.
A prompt-to-prompt edit (sample.py --edit) is one card: the source image and its edit side by side.

Everything goes inline into one file (images as PNG data URIs, maps as base64 little-endian float32),
so the page works from file:// with no server and no network. The page is template.html;
this module only fills its JSON blob.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from diffusion.errors import UserError, exit_on_user_error
from diffusion.maps.format import MAPS_FILE, read_arrays, read_manifest, step_images

REPORT_NAME = "report.html"
TEMPLATE_NAME = "template.html"
DATA_PLACEHOLDER = "/*__REPORT_DATA__*/null"
STEP_FOLDER = re.compile(r"step_(\d+)$")
SETTINGS = ("seed", "scheduler", "steps", "guidance_scale", "negative_prompt", "model", "training_step")


def encode_floats(array: np.ndarray) -> str:
    """float32 little-endian bytes, base64: what the page decodes into a Float32Array."""
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode("ascii")


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def read_sample(image: Path) -> dict:
    """What the page needs of one image: the picture, its prompt's tokens and words, and its maps."""
    attn = image.with_suffix(".attn")
    record = {"name": image.stem, "file": image.name, "image": png_data_uri(image), "maps": None}
    if not attn.is_dir():
        return record  # the empty prompt, or sampled with --no-maps: shown without maps
    manifest = read_manifest(attn)
    arrays = read_arrays(attn, manifest)
    record.update(
        prompt=manifest["prompt"],
        tokens=manifest["tokens"],
        word_of_token=manifest["word_of_token"],
        words=manifest["words"],
        start_token=manifest["start_token"],
        end_token=manifest["end_token"],
        dropped_words=manifest.get("dropped_words", ""),
        layers={name: manifest["layers"].get(name) for name in manifest.get("layers_saved", [])},
        heads=dict(manifest.get("heads_saved") or {}),  # layer -> number of heads whose own maps were saved
        num_layers=len(manifest.get("layers", {})),
        snapshot_steps=manifest.get("snapshot_steps", []),
        snapshot_images=[png_data_uri(path) for path in step_images(attn, manifest)],
        num_steps=manifest.get("steps") or len(manifest.get("timesteps_aggregated", [])),
        size=int(arrays["global"].shape[-1]),
        settings={key: manifest[key] for key in SETTINGS if key in manifest},
        maps={key: encode_floats(array) for key, array in arrays.items()},
        map_file=str(attn / MAPS_FILE),
    )
    return record


def sample_images(folder: Path) -> list[Path]:
    """The images of a folder if any has maps beside it (those without are listed too), else none."""
    images = sorted(folder.glob("*.png"))
    orphans = [attn for attn in sorted(folder.glob("*.attn")) if not attn.with_suffix(".png").is_file()]
    if orphans:
        raise UserError(f"{orphans[0]} has no image beside it: {orphans[0].with_suffix('.png')} is missing")
    return images if any(image.with_suffix(".attn").is_dir() for image in images) else []


def validation_folders(folder: Path) -> list[tuple[int, Path]]:
    """(training step, folder) of a run's validation/step_NNNNNN/ folders, oldest first."""
    root = folder / "validation" if (folder / "validation").is_dir() else folder
    found = []
    for path in root.iterdir() if root.is_dir() else []:
        match = STEP_FOLDER.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def no_maps_error(folder: Path) -> UserError:
    if not folder.is_dir():
        return UserError(f"{folder} does not exist; pass a folder that sample.py wrote (outputs/samples/<run name>)")
    return UserError(
        f"{folder} holds no attention maps: no <name>.attn/ folder beside any image, and no "
        "validation/step_NNNNNN/ folders of a training run. It was sampled with --no-maps (or only with the empty "
        "prompt, which has no words to map), or it is not a samples folder. Sample again with maps: "
        f'python sample.py --model <run> --prompt "..." --out {folder} --overwrite'
    )


def edit_of(image: Path) -> dict | None:
    """The `edit` record of an image's manifest (sample.py --edit), or None for a plain sample."""
    attn = image.with_suffix(".attn")
    return read_manifest(attn).get("edit") if attn.is_dir() else None


def pair_card(source_image: Path, edited_image: Path) -> dict:
    """One card of a prompt-to-prompt edit: the source and its edited image side by side, with the edit's
    settings and word alignment as the edited image's manifest records them."""
    return {"pair": [read_sample(source_image), read_sample(edited_image)], "edit": edit_of(edited_image)}


def sample_cards(images: list[Path]) -> list[dict]:
    """One card per image, except that an edited image and its source make one pair card (where the edited
    image stands); a source shows in each of its pairs, and alone only when none of its edits is there."""
    sources = {}  # edited image -> its source, where both are in the folder
    for image in images:
        edit = edit_of(image) or {}
        source = image.parent / Path(str(edit.get("source_image", ""))).name
        if edit.get("role") == "edited" and source != image and source in images:
            sources[image] = source
    paired = set(sources.values())
    return [pair_card(sources[image], image) if image in sources else {"samples": [read_sample(image)]}
            for image in images if image not in paired]


def collect(folder: str | Path) -> dict:
    """The page's data: one card per image (per edit pair), or per validation prompt across a run's training steps."""
    folder = Path(folder)
    images = sample_images(folder) if folder.is_dir() else []
    if images:
        return {"kind": "samples", "title": folder.name, "folder": str(folder), "cards": sample_cards(images)}
    steps = [(step, sample_images(path)) for step, path in validation_folders(folder)]
    steps = [(step, images) for step, images in steps if images]
    if not steps:
        raise no_maps_error(folder)
    by_name: dict[str, list[dict]] = {}
    for step, images in steps:
        for image in images:
            record = read_sample(image)
            record.setdefault("settings", {}).setdefault("training_step", step)
            by_name.setdefault(image.name, []).append(record)
    cards = [{"samples": samples} for samples in by_name.values()]
    title = folder.parent.name if folder.name == "validation" else folder.name
    return {"kind": "training", "title": title, "folder": str(folder), "cards": cards}


def render(data: dict) -> str:
    """The template with the data filled in; `<` is escaped so no prompt can close the script element."""
    template = resources.files("diffusion.viewer").joinpath(TEMPLATE_NAME).read_text(encoding="utf-8")
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # ASCII only: json escapes the rest
    return template.replace(DATA_PLACEHOLDER, blob, 1)


def build_report(folder: str | Path, out: str | Path | None = None, smooth: bool = False) -> Path:
    """Write one HTML page of a samples folder (or a run's validation maps); returns its path."""
    data = collect(folder)
    data["smooth"] = smooth
    path = Path(out) if out else Path(folder) / REPORT_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    return path


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffusion.viewer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="a samples folder (sample.py --out), a run folder, or its validation/")
    parser.add_argument("--out", help=f"where to write the page (default FOLDER/{REPORT_NAME})")
    parser.add_argument("--smooth", action="store_true", help="start with smooth upscaling instead of exact pixels")
    args = parser.parse_args(argv)
    path = build_report(args.folder, args.out, args.smooth)
    print(f"wrote {path} (open it in a browser; it needs no server)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
