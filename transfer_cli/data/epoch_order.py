"""The order a loader serves its examples in, and the loader interface the training loop iterates.

A training epoch's order is a pure function of (seed, epoch), and the random numbers of an example's
augmentation one of (seed, epoch, example index), so a resumed run sees exactly the batches the
interrupted one would have, whatever the batch size, worker count or sharding.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

Batch = dict[str, torch.Tensor]


@dataclass
class EpochOrder:
    """The order a loader visits its examples: shuffled per (seed, epoch) when training, else as stored."""

    num_samples: int
    shuffle: bool
    seed: int
    epoch: int = 0
    # data-parallel training: this process serves every world_size-th example of the order from rank on
    rank: int = 0
    world_size: int = 1
    # sharded training drops the order's last few examples so that every process takes the same steps
    even: bool = False

    def generator(self) -> torch.Generator:
        """The stream this epoch's shuffle draws from."""
        return _generator(self.seed, self.epoch)

    def augmentation_generator(self) -> torch.Generator:
        """The stream this epoch's augmentation draws from, one draw per example in stored order. It is
        apart from the shuffle's, so an example's augmentation depends on (seed, epoch, example index)
        alone: not on the order, the batching, the workers or the shard."""
        return _generator(self.seed, self.epoch, 1)

    def indices(self, generator: torch.Generator) -> torch.Tensor:
        order = torch.randperm(self.num_samples, generator=generator) if self.shuffle else torch.arange(self.num_samples)
        if self.world_size == 1:
            return order
        if self.even:
            order = order[:self.num_samples - self.num_samples % self.world_size]
        # every process draws the same permutation (same seed and epoch) and takes its own stride of it,
        # so the processes' i-th batches together are the i-th batch of a world_size times larger one
        return order[self.rank::self.world_size]

    @property
    def served(self) -> int:
        """How many examples one pass visits (this process's share when sharded)."""
        if self.world_size == 1:
            return self.num_samples
        if self.even:
            return self.num_samples // self.world_size
        return len(range(self.rank, self.num_samples, self.world_size))


def _generator(*entropy: int) -> torch.Generator:
    # SeedSequence mixes its entropy well: nearby seeds and epochs give unrelated streams
    state = np.random.SeedSequence(list(entropy)).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def batch_sizes(num_samples: int, batch_size: int, training: bool) -> list[int]:
    """The sizes of one pass's batches. A training pass folds a last batch of a single example into the
    one before: BatchNorm cannot normalise one example in training mode (50 examples in batches of 7 would
    otherwise crash on the last step)."""
    sizes = [batch_size] * (num_samples // batch_size) + ([num_samples % batch_size] if num_samples % batch_size else [])
    if training and len(sizes) > 1 and sizes[-1] == 1:
        single = sizes.pop()
        sizes[-1] += single
    return sizes


class BatchLoader:
    """Iterable of dict batches with a length; a shuffling loader's order depends on (seed, epoch) only."""

    #: True when examples are randomly augmented, i.e. the same example gives a new input every epoch
    augment = False

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int):
        self.batch_size = batch_size
        self.order = EpochOrder(num_samples, shuffle, seed)

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration follows."""
        self.order.epoch = epoch

    def shard(self, rank: int, world_size: int, even: bool) -> None:
        """Serve only process `rank`'s disjoint share of every epoch (data-parallel training); `even`
        drops up to world_size - 1 examples per epoch so that every share has the same size."""
        self.order.rank, self.order.world_size, self.order.even = rank, world_size, even

    def __len__(self) -> int:
        return len(batch_sizes(self.order.served, self.batch_size, training=self.order.shuffle))

    def batch_indices(self) -> Iterator[torch.Tensor]:
        """The example positions of each batch of the current epoch, in the order `__iter__` serves them."""
        order = self.order.indices(self.order.generator())
        return iter(order.split(batch_sizes(len(order), self.batch_size, self.order.shuffle)) if len(order) else ())

    @contextmanager
    def stored_order(self) -> Iterator[None]:
        """Iterate in stored order, unshuffled and unsharded, inside the block: a pass over every example
        whose batches do not depend on the epoch."""
        order = self.order
        saved = order.shuffle, order.rank, order.world_size
        order.shuffle, order.rank, order.world_size = False, 0, 1
        try:
            yield
        finally:
            order.shuffle, order.rank, order.world_size = saved

    def __iter__(self) -> Iterator[Batch]:
        raise NotImplementedError
