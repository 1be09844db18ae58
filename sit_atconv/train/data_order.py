"""Deterministic, resumable data order: which samples every rank sees at every step.

The order is a pure function of (seed, step): epoch e is a permutation seeded by (seed, e), and
global batch s takes the next `global_batch` indices, split across ranks. Resuming at step s needs
no iterator state, and the same seed gives the same batches whatever the restart point.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from ..seeding import AUGMENT, DATA_ORDER, derive_seed


def epoch_permutation(num_samples: int, seed: int, epoch: int, repeats: int = 1) -> torch.Tensor:
    """The order of epoch `epoch`; with `repeats` r > 1 (repeated augmentation, DeiT), N/r images each
    appear r times in a row, so an epoch is still N items."""
    generator = torch.Generator().manual_seed(derive_seed(DATA_ORDER, seed, epoch))
    order = torch.randperm(num_samples, generator=generator)
    return order if repeats == 1 else order.repeat_interleave(repeats)[:num_samples]


def global_batch_indices(step: int, global_batch: int, num_samples: int, seed: int, repeats: int = 1) -> torch.Tensor:
    """Dataset indices of global batch `step` (batches may straddle epochs)."""
    start = step * global_batch
    out, filled = [], 0
    while filled < global_batch:
        epoch, offset = divmod(start + filled, num_samples)
        take = min(global_batch - filled, num_samples - offset)
        out.append(epoch_permutation(num_samples, seed, epoch, repeats)[offset:offset + take])
        filled += take
    return torch.cat(out)


class ResumableBatchSampler(Sampler[list]):
    """Yields this rank's share of each global batch from `start_step` on (infinite).

    With `item_seeds`, each entry is (index, seed of that draw) for datasets that augment per item
    (`sit_atconv.data.SeededItems`): augmentations then depend on (seed, step, position) only, not on
    worker processes or restarts.
    """

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0, item_seeds: bool = False, repeats: int = 1):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {world_size} processes; "
                             f"choose a multiple of {world_size}.")
        if num_samples <= 0:
            raise ValueError("the dataset is empty.")
        self.num_samples, self.global_batch, self.seed = num_samples, global_batch, seed
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.per_rank, self.item_seeds, self.repeats = global_batch // world_size, item_seeds, repeats

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            batch = global_batch_indices(step, self.global_batch, self.num_samples, self.seed, self.repeats)
            first = self.rank * self.per_rank
            mine = batch[first:first + self.per_rank].tolist()
            if self.item_seeds:
                mine = [(i, derive_seed(AUGMENT, self.seed, step, first + k)) for k, i in enumerate(mine)]
            yield mine
            step += 1
