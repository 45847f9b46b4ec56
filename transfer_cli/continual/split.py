"""The class order and the stages of a class-incremental scenario, and each stage's examples.

As LAMDA-PILOT (and iCaRL) do: the class indices 0..C-1 are shuffled by numpy's legacy generator seeded
with `class_order_seed` (1993), and every label is renamed to its position in that order, so stage k holds
the labels [start_k, end_k). numpy's RandomState permutation is fixed by its seed on every machine.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from transfer_cli.data.splits import DataBundle, Split
from transfer_cli.errors import TransferCliError


@dataclass(frozen=True)
class Stage:
    """Stage `index` learns the (renamed) labels [start, end); tests on [0, end)."""

    index: int
    start: int
    end: int


def class_order(num_classes: int, seed: int) -> list[int]:
    """The original class indices in the order the stages meet them."""
    return [int(c) for c in np.random.RandomState(seed).permutation(num_classes)]


def plan_stages(num_classes: int, init_cls: int, increment: int) -> list[Stage]:
    """`init_cls` classes first, then `increment` more per stage (the last stage may be smaller)."""
    if not 0 < init_cls <= num_classes or increment < 1:
        raise TransferCliError(f"scenario.init_cls={init_cls} and scenario.increment={increment} must be at least 1, "
                               f"and init_cls at most the dataset's {num_classes} classes")
    bounds = [0, init_cls] + list(range(init_cls + increment, num_classes, increment)) + [num_classes]
    bounds = sorted(set(bounds))
    return [Stage(k, lo, hi) for k, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def reorder(bundle: DataBundle, order: list[int]) -> DataBundle:
    """Every split with its labels renamed to their position in `order`; class names follow."""
    position = torch.empty(len(order), dtype=torch.long)
    position[torch.tensor(order)] = torch.arange(len(order))

    def rename(split: Split) -> Split:
        return replace(split, labels=position[split.labels])

    return DataBundle(train=rename(bundle.train), val=rename(bundle.val), test=rename(bundle.test),
                      class_names=tuple(bundle.class_names[c] for c in order))


def labels_in(split: Split, start: int, end: int) -> Split:
    """The examples whose (renamed) label is in [start, end)."""
    keep = (split.labels >= start) & (split.labels < end)
    return split.select(torch.nonzero(keep).flatten())
