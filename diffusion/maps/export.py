"""The pictures saved beside each image's maps, for people: a grid of the image and one heat map per
word, and one overlay per word. The arrays and the manifest go through diffusion.maps.format.

    <name>.attn/grid.png              the image and one heat-map tile per word, with the word under it
    <name>.attn/words/NN_<word>.png   one overlay per word (NN: the word's position in the prompt)
    <name>.attn/steps/step_NNNN.png   with step snapshots: the denoised estimate after each snapshot step
    pairs/<edit name>.png             an edit's source over its edit (sample.py --edit)
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffusion.images import tile
from diffusion.maps.aggregate import ImageAttention
from diffusion.maps.format import STEP_IMAGE, attn_folder, write_maps

DISPLAY_SIZE = 256  # overlays and grid tiles are upscaled to this many pixels (nearest neighbour)

# A perceptually ordered colour map (dark blue -> teal -> yellow), interpolated between anchors.
_ANCHORS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32
)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB uint8 (H, W, 3)."""
    position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).round().astype(np.uint8)


def slug(prompt: str, max_length: int = 60) -> str:
    """A safe file-name stem for a prompt: no path separators, bounded length."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_length].strip("-")
    return text or "unconditional"


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """Blend a heat map (S, S), normalised to its own maximum, over the image; upscaled for viewing."""
    values = heat.numpy()
    peak = values.max()
    coloured = colormap(values / peak if peak > 0 else values)
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    mixed = (1 - alpha) * base + alpha * coloured.astype(np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8)).resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST)


def labelled(picture: Image.Image, label: str) -> Image.Image:
    out = Image.new("RGB", (picture.width, picture.height + 20), "white")
    out.paste(picture, (0, 0))
    ImageDraw.Draw(out).text((4, picture.height + 4), label, fill="black")
    return out


def word_file_names(words: list[str]) -> list[str]:
    return [f"{i:02d}_{slug(w, 30)}.png" for i, w in enumerate(words)]


def save_image_with_maps(image: Image.Image, attention: ImageAttention | None, image_path: Path, extra: dict) -> None:
    """Write the image and, when maps were recorded, its `.attn/` folder beside it."""
    image.save(image_path)
    if attention is None:
        return
    folder = attn_folder(image_path)
    (folder / "words").mkdir(parents=True, exist_ok=True)
    words = attention.word_maps()  # (W, S, S)
    names = word_file_names(attention.tokens.words)
    tiles = [labelled(image.resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST), "image")]
    for name, word, heat in zip(names, attention.tokens.words, words):
        picture = overlay(image, heat)
        picture.save(folder / "words" / name)
        tiles.append(labelled(picture, f"{word}  (peak {heat.max():.2f})"))
    tile(tiles, columns=len(tiles)).save(folder / "grid.png")
    step_images = {i: STEP_IMAGE.format(i) for i in sorted(attention.snapshot_images)}
    for i, name in step_images.items():
        (folder / name).parent.mkdir(exist_ok=True)
        attention.snapshot_images[i].save(folder / name)

    arrays = {"global": attention.global_map, "words": words}
    arrays.update({f"layer/{name}": m for name, m in attention.layers.items()})
    arrays.update({f"layer/{name}/head{k}": m for name, heads in attention.heads.items() for k, m in enumerate(heads)})
    arrays.update({f"step/{i}": m for i, m in attention.snapshots.items()})
    tokens = attention.tokens
    manifest = {
        "image": image_path.name,
        "prompt": tokens.prompt,
        "tokens": tokens.tokens,
        "word_of_token": tokens.word_of_token,
        "words": tokens.words,
        "word_files": names,
        "start_token": tokens.start_token,
        "end_token": tokens.end_token,
        "num_padding_tokens": tokens.num_padding,
        "dropped_words": tokens.dropped_words,
        "layers": attention.layer_resolutions,
        "layers_saved": sorted(attention.layers),
        "heads_saved": {name: len(heads) for name, heads in sorted(attention.heads.items())},
        "snapshot_steps": sorted(attention.snapshots),
        "snapshot_images": list(step_images.values()),
        "timesteps_aggregated": attention.steps_aggregated,
        "aggregation": {
            "heads": "mean (and each head's own under layer/<name>/head<k>, where heads_saved lists the layer)",
            "steps": "mean over the aggregated steps (running sum)",
            "layers": "global = mean over layers after upsampling",
            **attention.settings.to_dict(),
        },
        **extra,
    }
    write_maps(folder, {k: v.float().numpy() for k, v in arrays.items()}, manifest)


def save_pair(source: Path, edited: Path, pair: Path, source_prompt: str, edited_prompt: str) -> None:
    """One picture of an edit: the source's grid over the edit's (image and word maps), or with no maps
    the two images side by side."""
    grids = [attn_folder(path) / "grid.png" for path in (source, edited)]
    if all(grid.is_file() for grid in grids):
        rows = [labelled(Image.open(grid).convert("RGB"), text) for grid, text in zip(grids, ("source: " + source_prompt, "edit: " + edited_prompt))]
        picture = tile(rows, columns=1)
    else:
        images = [Image.open(path).convert("RGB").resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.NEAREST) for path in (source, edited)]
        picture = tile([labelled(images[0], source_prompt), labelled(images[1], edited_prompt)], columns=2)
    pair.parent.mkdir(parents=True, exist_ok=True)
    picture.save(pair)
