"""Training batches: which rows each process trains on at each micro-step, and the batch itself,
assembled on the training device from tables put there once.

A resumed run sees the same batches as an uninterrupted one (`BatchOrder` is a pure function of the
seed and the micro-step), and no step waits on the host: the images, the masks, each row's caption
(as a row of the text states) and each caption's token objects are looked up by index on the device.
"""

from __future__ import annotations

import logging

import torch

from diffusion.config import TrainConfig
from diffusion.data.folder import CaptionedImageFolder, swap_left_right
from diffusion.training.grounding import TokenObjectTable
from diffusion.training.objective import Grounding
from diffusion.training.setup import TrainingError
from diffusion.training.text_states import CaptionRows

logger = logging.getLogger("diffusion")

DEVICE_SHARE = 0.25  # the dataset's tables go onto a GPU when they take at most this share of its free memory


class BatchOrder:
    """A pure function of (seed, micro-step): every epoch is a fresh seeded permutation, split into
    global batches, and each process takes every `world`-th row of it. Resuming at a micro-step
    therefore continues with exactly the batches an uninterrupted run would have seen. The epoch's
    permutation is drawn once (on the host, from its own generator) and kept on `device`.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int, world: int, device: torch.device | str = "cpu"):
        self.global_batch = batch_size * world
        if num_rows < self.global_batch:
            raise TrainingError(
                f"the dataset has {num_rows} usable images, fewer than one batch of {self.global_batch} "
                f"({batch_size} per process x {world}); lower train.batch_size or add images"
            )
        self.num_rows, self.seed, self.rank, self.world, self.device = num_rows, seed, rank, world, device
        self.batches_per_epoch = num_rows // self.global_batch
        self.epoch, self.order = -1, torch.empty(0, dtype=torch.long)

    def rows(self, micro_step: int) -> torch.Tensor:
        """(B,) this process's rows at `micro_step`, on `device`."""
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        if epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.epoch, self.order = epoch, torch.randperm(self.num_rows, generator=generator).to(self.device)
        batch = self.order[index * self.global_batch : (index + 1) * self.global_batch]
        return batch[self.rank :: self.world]


def table_device(nbytes: int, device: torch.device) -> torch.device:
    """Where the dataset's tables live: on a GPU when they fit in DEVICE_SHARE of its free memory, else on the host."""
    if device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes <= DEVICE_SHARE * free:
        return device
    logger.info("the dataset (%.0f MB) stays in host memory: more than %d%% of the GPU's free memory",
                nbytes / 1e6, 100 * DEVICE_SHARE)
    return torch.device("cpu")


class TrainingBatches:
    """Each micro-step's (images, caption rows, grounding targets) on `device`.

    Tables, one row per dataset row: images (N, 3, S, S) uint8, masks (N, S, S), captions (N, C) as rows
    of the text states (C: the most captions a row has), with their left/right-swapped twins when hflip
    is on, and token objects (N, T) of grounded rows. Per step: index, then the random parts (which of
    several captions, a mirror, the caption dropped for classifier-free guidance) drawn on the device.
    """

    def __init__(self, dataset: CaptionedImageFolder, captions: CaptionRows, token_objects: TokenObjectTable | None,
                 t: TrainConfig, device: torch.device, rank: int = 0, world: int = 1):
        self.device, self.dropout, self.hflip = device, t.caption_dropout, dataset.hflip
        sets = dataset.caption_sets
        tables = {"images": dataset.images, "counts": torch.tensor([len(s) for s in sets])}
        tables["captions"] = caption_table(sets, captions)  # (N, C)
        if self.hflip:
            tables["flipped"] = caption_table([tuple(swap_left_right(c) for c in s) for s in sets], captions)
        self.grounding = token_objects is not None
        if self.grounding:
            tables["masks"] = dataset.masks
            tables["objects"] = token_objects([s[0] for s in sets], dataset.word_objects)  # (N, T)
            if self.hflip:
                tables["flipped_objects"] = token_objects([swap_left_right(s[0]) for s in sets], dataset.word_objects)
            self.num_objects = dataset.num_objects
        self.store = table_device(sum(v.nbytes for v in tables.values()), device)
        self.tables = {name: table.to(self.store) for name, table in tables.items()}
        self.several = bool(tables["counts"].max() > 1)  # once: does any row have several captions to draw from?
        self.order = BatchOrder(len(dataset), t.batch_size, t.seed, rank, world, self.store)

    def __call__(self, micro_step: int) -> tuple[torch.Tensor, torch.Tensor, Grounding | None]:
        """Images (B, C, S, S) in [-1, 1], caption rows (B,) with some dropped to the null prompt (classifier-free
        guidance learns it), and the grounding targets of the captions kept (None without grounding)."""
        rows = self.order.rows(micro_step)  # (B,)
        take = {name: self.on_device(table[rows]) for name, table in self.tables.items()}
        b = rows.shape[0]
        # 1. One of each row's captions (drawn only where some row has several).
        choice = (torch.rand(b, device=self.device) * take["counts"]).long() if self.several else torch.zeros_like(take["counts"])
        caption_rows = take["captions"].gather(1, choice[:, None])[:, 0]  # (B,)
        images = take["images"].float() / 127.5 - 1.0  # (B, 3, S, S)
        masks, objects = take.get("masks"), take.get("objects")
        # 2. With hflip, mirror half the images (their masks, and "left" <-> "right" in their captions).
        if self.hflip:
            flip = torch.rand(b, device=self.device) < 0.5  # (B,)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
            caption_rows = torch.where(flip, take["flipped"].gather(1, choice[:, None])[:, 0], caption_rows)
            if self.grounding:
                masks = torch.where(flip[:, None, None], masks.flip(-1), masks)
                objects = torch.where(flip[:, None], take["flipped_objects"], objects)
        # 3. Drop captions to the null prompt; a dropped caption grounds nothing.
        dropped = torch.rand(b, device=self.device) < self.dropout  # (B,)
        caption_rows = caption_rows.masked_fill(dropped, CaptionRows.NULL_ROW)
        if not self.grounding:
            return images, caption_rows, None
        objects = objects.masked_fill(dropped[:, None], 0)  # (B, T)
        return images, caption_rows, Grounding(objects, masks, self.num_objects)

    def on_device(self, part: torch.Tensor) -> torch.Tensor:
        """A batch's slice of a table on the training device (a copy from pinned memory where the tables stay on the host)."""
        return part if self.store == self.device else part.pin_memory().to(self.device, non_blocking=True)


def caption_table(caption_sets: list[tuple[str, ...]], captions: CaptionRows) -> torch.Tensor:
    """(N, C) each row's captions as rows of the text states, padded by repeating its first."""
    width = max(len(s) for s in caption_sets)
    return torch.tensor([[captions.row[c] for c in s] + [captions.row[s[0]]] * (width - len(s)) for s in caption_sets])
