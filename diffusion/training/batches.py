"""Which dataset rows each process trains on at each micro-step, so a resumed run sees the same batches."""

from __future__ import annotations

import torch

from diffusion.training.setup import TrainingError


class BatchOrder:
    """A pure function of (seed, micro-step): every epoch is a fresh seeded permutation, split into
    global batches, and each process takes every `world`-th row of it. Resuming at a micro-step
    therefore continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, rank: int, world: int):
        self.global_batch = batch_size * world
        if num_rows < self.global_batch:
            raise TrainingError(
                f"the dataset has {num_rows} usable images, fewer than one batch of {self.global_batch} "
                f"({batch_size} per process x {world}); lower train.batch_size or add images"
            )
        self.num_rows, self.seed, self.rank, self.world = num_rows, seed, rank, world
        self.batches_per_epoch = num_rows // self.global_batch

    def rows(self, micro_step: int) -> torch.Tensor:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_rows, generator=generator)
        batch = order[index * self.global_batch : (index + 1) * self.global_batch]
        return batch[self.rank :: self.world]
