"""A deterministic detector for shapes images: which objects are there, their colour, shape, size and place.

Works on RGB uint8 images of any size showing flat palette-coloured shapes on white (the dataset's
images, or a model's attempts at them):

1. every pixel takes the nearest of the palette colours and white; a pixel nearer to white, or
   farther than `max_colour_distance` from every palette colour, is background;
2. foreground pixels are grouped into 8-connected components; components smaller than
   `min_area_fraction` of the smallest shape the dataset draws (a small star) are specks and dropped;
3. a component whose pixels are split between two palette colours, each holding at least
   `split_fraction` of them, is two touching objects and is split by colour; otherwise the
   object takes its majority colour (`purity` says how much of it has that colour);
4. each object's shape is the shape of the best-fitting template, drawn by the dataset's own
   rasteriser (`diffusion.data.shapes.INSIDE_TESTS`) over a grid of sizes and centres: the highest IoU
   wins (`shape_fit` is that IoU; below `min_shape_fit` the shape is "unknown") and the fitted
   half-extent gives the size class (the nearest of the dataset's size fractions).

No randomness anywhere: the same image always gives the same detections.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from diffusion.data.scenes import SceneObject
from diffusion.data.shapes import INSIDE_TESTS, SQUARE_HALF_SIDE, object_mask
from diffusion.data.vocabulary import BACKGROUND, PALETTE, SIZE_FRACTIONS

NEIGHBOURS_8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


@dataclass
class DetectorSettings:
    """Every threshold the detector uses; written into evaluation results beside the scores."""

    # A pixel farther than this (Euclidean, RGB 0..255) from its nearest palette colour is background.
    max_colour_distance: float = 110.0
    # Components below this fraction of the smallest object the dataset draws are noise specks.
    min_area_fraction: float = 0.35
    # A component is split by colour when a second colour holds at least this fraction of it.
    split_fraction: float = 0.3
    # Template search: half-extents within +-`radius_range` px of the bbox estimate, in steps of
    # `radius_step`; centres within +-`centre_range` px of the bbox centre, in steps of `centre_step`.
    radius_range: float = 1.2
    radius_step: float = 0.2
    centre_range: float = 1.0
    centre_step: float = 0.5
    # An object whose best template covers less than this IoU has shape "unknown" (a shapeless blob).
    min_shape_fit: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Detection:
    """One object found in an image."""

    colour: str
    shape: str  # one of diffusion.data.shapes.SHAPE_NAMES, or "unknown" (no template fits)
    size: str  # "small", "medium" or "large": the nearest of the dataset's size fractions
    bbox: list[int]  # [x0, y0, x1, y1], x1 and y1 exclusive (as in the dataset's metadata)
    centre: tuple[float, float]  # (x, y): the mean of the object's pixel centres
    area: int
    purity: float  # fraction of the object's pixels that have its colour
    shape_fit: float  # IoU of the object with its best-fitting template
    half_extent: float  # the fitted template's half-extent in pixels
    mask: np.ndarray = field(repr=False)  # bool (S, S)

    def describe(self) -> str:
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["mask"]
        return out


def nearest_colours(image: np.ndarray, palette: dict[str, tuple[int, int, int]], max_distance: float) -> np.ndarray:
    """(S, S) int: index into palette's colours, or -1 for background (nearer white, or too far from all)."""
    pixels = image.astype(np.float32)  # (S, S, 3)
    refs = np.array([BACKGROUND, *palette.values()], dtype=np.float32)  # (1 + C, 3)
    dist = np.linalg.norm(pixels[:, :, None, :] - refs[None, None], axis=-1)  # (S, S, 1 + C)
    nearest = dist.argmin(axis=-1) - 1  # background -> -1
    too_far = dist.min(axis=-1) > max_distance
    nearest[too_far] = -1
    return nearest


def connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a bool mask, as (N, 2) arrays of (y, x), in scan order."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for dy, dx in NEIGHBOURS_8:
                ny, nx = y + dy, x + dx
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        components.append(np.array(pixels))
    return components


def smallest_object_area(image_size: int) -> int:
    """Pixels of the smallest object the dataset draws (a small star) at this image size."""
    centre = (image_size / 2, image_size / 2)
    small = SIZE_FRACTIONS["small"] * image_size
    return int(min(object_mask(SceneObject(s, "red", "small", centre, small), image_size).sum() for s in INSIDE_TESTS))


def size_class(half_extent: float, image_size: int) -> str:
    fraction = half_extent / image_size
    names = list(SIZE_FRACTIONS)
    return names[int(np.argmin([abs(fraction - SIZE_FRACTIONS[n]) for n in names]))]


def fit_shape(mask: np.ndarray, settings: DetectorSettings) -> tuple[str, float, float]:
    """(shape, IoU, half-extent) of the best template for one object's bool mask (S, S).

    The templates are the dataset's own shapes (`diffusion.data.shapes.INSIDE_TESTS`). Every shape is
    centred in its own bbox to within a pixel, and its half-extent follows from the bbox's longer
    side (half of it; a square's side is 2 * SQUARE_HALF_SIDE half-extents), so each shape is drawn
    at half-extents around that estimate (plus the dataset's nominal sizes nearby) and at centres
    around the bbox centre, on a crop around the object. Ties go to the first shape in INSIDE_TESTS.
    """
    ys, xs = np.nonzero(mask)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    longer = max(x1 - x0, y1 - y0)
    pad = int(np.ceil(settings.radius_range + settings.centre_range)) + 1
    cy0, cy1 = max(y0 - pad, 0), min(y1 + pad, mask.shape[0])
    cx0, cx1 = max(x0 - pad, 0), min(x1 + pad, mask.shape[1])
    crop = mask[cy0:cy1, cx0:cx1].reshape(-1)  # (P,)
    py, px = np.meshgrid(np.arange(cy0, cy1) + 0.5, np.arange(cx0, cx1) + 0.5, indexing="ij")
    px, py = px.reshape(-1), py.reshape(-1)
    area = crop.sum()
    nominal = np.array(list(SIZE_FRACTIONS.values())) * mask.shape[0]
    span = settings.radius_range
    offsets = np.arange(-settings.centre_range, settings.centre_range + 1e-6, settings.centre_step)

    best = ("circle", -1.0, 0.0)
    for shape, inside in INSIDE_TESTS.items():
        # 1. Candidate (half-extent, cx, cy), flattened to K candidates.
        estimate = longer / 2 / (SQUARE_HALF_SIDE if shape == "square" else 1.0)
        radii = estimate + np.arange(-span, span + 1e-6, settings.radius_step)
        radii = np.concatenate([radii, nominal[np.abs(nominal - estimate) <= span]])
        radii = radii[radii > 0.5]
        r, ox, oy = (a.reshape(-1) for a in np.meshgrid(radii, offsets, offsets, indexing="ij"))  # (K,)
        cx, cy = (x0 + x1) / 2 + ox, (y0 + y1) / 2 + oy
        # 2. IoU of every candidate template with the object; keep the best.
        template = inside(px[None, :] - cx[:, None], py[None, :] - cy[:, None], r[:, None])  # (K, P) bool
        inter = (template & crop[None]).sum(axis=1)
        iou = inter / (template.sum(axis=1) + area - inter)
        k = int(np.argmax(iou))
        if iou[k] > best[1] + 1e-9:
            best = (shape, float(iou[k]), float(r[k]))
    return best


def detect(
    image: np.ndarray,
    palette: dict[str, tuple[int, int, int]] | None = None,
    settings: DetectorSettings | None = None,
) -> list[Detection]:
    """The objects in an RGB uint8 image (S, S, 3), largest first.

    palette: the colours to recognise (default: the full PALETTE; pass the dataset's own palette
    so that a model's off-palette blends go to the nearest colour it was trained on).
    """
    palette = PALETTE if palette is None else palette
    settings = settings or DetectorSettings()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"expected a square RGB image (S, S, 3), got shape {image.shape}")
    size = image.shape[0]
    names = list(palette)
    labels = nearest_colours(image, palette, settings.max_colour_distance)  # (S, S)
    min_area = max(2, int(round(settings.min_area_fraction * smallest_object_area(size))))

    detections = []
    for pixels in connected_components(labels >= 0):
        if len(pixels) < min_area:
            continue
        for part in split_by_colour(pixels, labels, min_area, settings.split_fraction):
            detections.append(describe_object(part, labels, names, size, settings))
    detections.sort(key=lambda d: (-d.area, d.bbox))
    return detections


def split_by_colour(pixels: np.ndarray, labels: np.ndarray, min_area: int, split_fraction: float) -> list[np.ndarray]:
    """One component -> one object, or one per colour when two or more colours each hold a large share.

    When split, each colour's largest connected part is an object; stray pixels of minor colours
    join the object whose colour pixels are nearest (so masks still cover the whole component).
    """
    colours = labels[pixels[:, 0], pixels[:, 1]]
    counts = np.bincount(colours, minlength=labels.max() + 1)
    major = [c for c in np.argsort(-counts, kind="stable") if counts[c] >= max(min_area, split_fraction * len(pixels))]
    if len(major) < 2:
        return [pixels]
    seeds = []
    for c in major:
        own = np.zeros(labels.shape, dtype=bool)
        own[pixels[colours == c, 0], pixels[colours == c, 1]] = True
        seeds.append(max(connected_components(own), key=len))
    # Every pixel of the component goes to the object with the nearest seed pixel.
    dist = np.stack(
        [np.min(np.abs(pixels[:, None, :] - s[None, :, :]).sum(-1), axis=1) for s in seeds]
    )  # (objects, N), city-block distance
    owner = dist.argmin(axis=0)
    return [pixels[owner == k] for k in range(len(seeds))]


def describe_object(
    pixels: np.ndarray, labels: np.ndarray, names: list[str], size: int, settings: DetectorSettings
) -> Detection:
    mask = np.zeros(labels.shape, dtype=bool)
    mask[pixels[:, 0], pixels[:, 1]] = True
    colours = labels[pixels[:, 0], pixels[:, 1]]
    counts = np.bincount(colours, minlength=len(names))
    colour = int(np.argmax(counts))  # ties: the first colour in palette order
    shape, fit, half = fit_shape(mask, settings)
    if fit < settings.min_shape_fit:
        shape = "unknown"
    ys, xs = pixels[:, 0], pixels[:, 1]
    return Detection(
        colour=names[colour],
        shape=shape,
        size=size_class(half, size),
        bbox=[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1],
        centre=(float(xs.mean() + 0.5), float(ys.mean() + 0.5)),
        area=int(len(pixels)),
        purity=float(counts[colour] / len(pixels)),
        shape_fit=fit,
        half_extent=half,
        mask=mask,
    )
