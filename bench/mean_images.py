"""What the model predicts at pure noise, beside what the data says it should: mean images per relation.

At the first sampling step (t = T, zero terminal SNR) the best prediction of the clean image is the mean
image of the caption's scenes. For one colour pair and each relation, this sheet shows:

    column 1: the mean of the training images whose two objects have those colours in that relation
    columns 2..: each model's first-step prediction of x0 (unguided), averaged over noise seeds,
                 for "a <colour A> circle <relation> a <colour B> square"

If the model used the relation, its columns would lean like the data's.

    PYTHONPATH=. python bench/mean_images.py outputs/runs/long/model-15min outputs/runs/long/model-120min \
        --out bench/results/mean_images_default.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from layout_probe import first_step_x0
from relation_curve import data_dirs, relation_groups

from diffusion.data.folder import CaptionedImageFolder
from diffusion.images import tile
from diffusion.runs import find_model_dir, read_run_config
from diffusion.sampling.pipeline import TextToImagePipeline, to_pil
from diffusion.data.relations import RELATIONS

SCALE = 4  # pixels per image pixel in the sheet


def data_means(model: str, colours: tuple[str, str]) -> dict[str, torch.Tensor]:
    """Per relation, the mean training image (3, S, S) in [-1, 1] of two-object rows with these colours."""
    cfg = read_run_config(find_model_dir(model))
    data = CaptionedImageFolder(data_dirs(model)[0], cfg.data.image_size, progress=False)
    groups = relation_groups(data)
    means = {}
    for relation in RELATIONS:
        images = [image for key, image in groups if key == (*colours, relation)]
        means[relation] = torch.stack(images).mean(dim=0)  # (3, S, S) in [-1, 1]
    return means


def labelled(image: torch.Tensor, text: str) -> Image.Image:
    picture = to_pil(image[None])[0]
    picture = picture.resize((picture.width * SCALE, picture.height * SCALE), Image.Resampling.NEAREST)
    sheet = Image.new("RGB", (picture.width, picture.height + 14), "white")
    sheet.paste(picture, (0, 14))
    ImageDraw.Draw(sheet).text((2, 1), text, fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--colours", default="red,blue", help="subject and reference colour (default red,blue)")
    parser.add_argument("--seeds", type=int, default=16)
    args = parser.parse_args()

    a, b = args.colours.split(",")
    means = data_means(args.models[0], (a, b))
    pipes = [TextToImagePipeline.from_run(m) for m in args.models]
    tiles = []
    for relation in RELATIONS:
        tiles.append(labelled(means[relation], f"data: {relation}"))
        prompt = f"a {a} circle {relation} a {b} square"
        for model, pipe in zip(args.models, pipes):
            x0 = first_step_x0(pipe, [prompt] * args.seeds, list(range(args.seeds)), 1.0).mean(dim=0)  # (3, S, S)
            tiles.append(labelled(x0, Path(model).name))
    tile(tiles, 1 + len(args.models)).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
