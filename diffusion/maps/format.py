"""The attention-map file format, in one place: what sits beside every sampled image, and how it is
written and read back (by the exporter, the viewer and the evaluation). numpy only, no torch.

    <name>.png                 the image
    <name>.attn/manifest.json  prompt, tokens, token -> word, special tokens, layers, steps, settings
    <name>.attn/maps.npz       float32 arrays, each (tokens or words, S, S): global (T, S, S) per kept
                               token, words (W, S, S), layer/<layer name> (T, S, S), step/<index> (T, S, S),
                               and with --head-maps layer/<layer name>/head<k> (T, S, S) for each head k
                               of each layer in the manifest's heads_saved ({layer name: heads})

(The pictures in <name>.attn/ -- grid.png, words/NN_<word>.png -- are for people; diffusion.maps.export.)
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from diffusion.errors import UserError

MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAPS_FILE = "maps.npz"
STEP_IMAGE = "steps/step_{:04d}.png"  # the x_0 estimate beside snapshot step/<index>
REQUIRED = ("prompt", "tokens", "word_of_token", "words", "start_token", "end_token", "layers")


def attn_folder(image_path: Path) -> Path:
    """<name>.png -> <name>.attn/"""
    return Path(image_path).with_suffix(".attn")


def write_maps(folder: Path, arrays: dict[str, np.ndarray], manifest: dict) -> None:
    """maps.npz (float32 arrays by name) and manifest.json (the format's version and file fields added)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / MAPS_FILE, **{k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()})
    record = {"version": MANIFEST_VERSION, **manifest}
    record["arrays"] = {"file": MAPS_FILE, "shape": "(tokens, height, width)", "dtype": "float32"}
    (folder / MANIFEST_FILE).write_text(json.dumps(record, indent=1) + "\n")


def read_manifest(attn: Path) -> dict:
    """An .attn folder's manifest, checked for a version this viewer reads."""
    path = attn / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing; the maps in {attn} cannot be read without it. Sample the image again.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); sample the image again") from None
    version = manifest.get("version")
    if version != MANIFEST_VERSION:
        raise UserError(
            f"{path} has manifest version {version!r}, but this version of the project reads version {MANIFEST_VERSION} only; "
            "read it with the version of this project that sampled it, or sample the images again with this one"
        )
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise UserError(f"{path} lacks the key(s) {', '.join(missing)}; sample the image again")
    return manifest


def read_arrays(attn: Path, manifest: dict, only: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays the manifest promises (or just those named in `only`), each checked to be there with
    shape (tokens, S, S), or (words, S, S) for "words"."""
    path = attn / MAPS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing (the map file beside {attn / MANIFEST_FILE}); sample the image again")
    needed = ["global", "words"]
    needed += [f"layer/{name}" for name in manifest.get("layers_saved", [])]
    needed += [f"step/{index}" for index in manifest.get("snapshot_steps", [])]
    needed += [f"layer/{name}/head{k}" for name, heads in manifest.get("heads_saved", {}).items() for k in range(heads)]
    needed = [key for key in needed if only is None or key in only]
    try:
        with np.load(path) as stored:
            missing = [key for key in needed if key not in stored.files]
            if missing:
                raise UserError(
                    f"{path} lacks the array(s) {', '.join(missing)} that its manifest lists; sample the image again"
                )
            arrays = {key: stored[key].astype(np.float32) for key in needed}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} could not be read ({error}); sample the image again") from None
    tokens, words = len(manifest["tokens"]), len(manifest["words"])
    for key, array in arrays.items():
        expected = words if key == "words" else tokens
        if array.ndim != 3 or array.shape[0] != expected or array.shape[1] != array.shape[2]:
            raise UserError(f"{path}: array {key} has shape {array.shape}, expected ({expected}, S, S)")
    return arrays


def step_images(attn: Path, manifest: dict) -> list[Path]:
    """The denoised image of each snapshot step, in snapshot_steps order; [] where none were saved."""
    paths = [attn / name for name in manifest.get("snapshot_images", [])]
    missing = [path for path in paths if not path.is_file()]
    if missing:
        raise UserError(f"{missing[0]} is missing (its manifest lists it); sample the image again")
    if paths and len(paths) != len(manifest.get("snapshot_steps", [])):
        raise UserError(f"{attn / MANIFEST_FILE} lists {len(paths)} step images for {len(manifest['snapshot_steps'])} snapshot steps; sample the image again")
    return paths


def read_word_maps(image_path: Path) -> tuple[list[str], np.ndarray]:
    """(words, maps (W, S, S)) of the image at `image_path`, from its .attn/ folder."""
    folder = attn_folder(image_path)
    manifest = read_manifest(folder)
    return manifest["words"], read_arrays(folder, manifest, only=("words",))["words"]
