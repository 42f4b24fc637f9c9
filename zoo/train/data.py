"""A batch order that is a pure function of (seed, step), so a resumed run sees exactly the batches
an uninterrupted run would have seen, mid-epoch included."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class StepBatchSampler(Sampler[list[int]]):
    """Yields this process's micro-batches of dataset indices, starting at optimizer step ``start_step``.

    Each epoch is a permutation of the dataset drawn from ``(seed, epoch)``. Global batches of
    ``global_batch`` consecutive indices (the last partial batch is dropped) are split into
    ``accum`` micro-batches, and each micro-batch into ``world`` equal shards; process ``rank``
    gets its shard. The stream is infinite; the trainer stops it.
    """

    def __init__(self, num_items: int, global_batch: int, *, seed: int, accum: int = 1, rank: int = 0,
                 world: int = 1, start_step: int = 0):
        if global_batch % (accum * world):
            raise ValueError(f"train.batch_size {global_batch} is not divisible by grad_accum_steps × processes "
                             f"= {accum} × {world}")
        if num_items < global_batch:
            raise ValueError(f"the dataset has {num_items} items, fewer than one batch of {global_batch}; "
                             f"lower train.batch_size")
        self.num_items = num_items
        self.global_batch = global_batch
        self.seed = seed
        self.accum = accum
        self.rank = rank
        self.world = world
        self.start_step = start_step
        self.steps_per_epoch = num_items // global_batch
        self.micro = global_batch // (accum * world)

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def __iter__(self):
        step = self.start_step
        epoch, perm = -1, None
        while True:
            if self.epoch_of(step) != epoch:
                epoch = self.epoch_of(step)
                perm = self.epoch_permutation(epoch)
            offset = (step % self.steps_per_epoch) * self.global_batch
            batch = perm[offset: offset + self.global_batch]
            for a in range(self.accum):
                chunk = batch[a * self.micro * self.world: (a + 1) * self.micro * self.world]
                yield chunk[self.rank * self.micro: (self.rank + 1) * self.micro].tolist()
            step += 1

    def __len__(self) -> int:  # one epoch of micro-batches; the iterator itself does not end
        return self.steps_per_epoch * self.accum
