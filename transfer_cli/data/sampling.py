"""Seeded, stratified index draws: the one primitive behind val/test carving and the subset options.

Every draw goes class by class, so class proportions survive and a class never vanishes from the
larger side by bad luck.
"""
from __future__ import annotations

import math

import torch


def class_indices(labels: torch.Tensor) -> dict[int, torch.Tensor]:
    """Label -> the (ascending) positions holding it."""
    return {int(c): torch.nonzero(labels == c).flatten() for c in torch.unique(labels)}


def stratified_split(
    labels: torch.Tensor, fraction: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions into (rest, taken) with `fraction` of each class in `taken`.

    A class of n >= 2 examples puts round(fraction * n) in `taken`, but at least one and never all,
    so both sides see every class; a singleton stays in `rest`. Both index tensors are sorted.
    """
    rest, taken = [], []
    for positions in class_indices(labels).values():
        n = len(positions)
        k = min(max(math.floor(fraction * n + 0.5), 1), n - 1) if fraction > 0 and n >= 2 else 0
        shuffled = positions[torch.randperm(n, generator=generator)]
        taken.append(shuffled[:k])
        rest.append(shuffled[k:])
    return _sorted_cat(rest), _sorted_cat(taken)


def per_class_draw(
    positions: dict[int, torch.Tensor], k: int, generator: torch.Generator
) -> torch.Tensor:
    """k random positions of every class (the caller checks each class has k).

    Each class is shuffled in label order, so for one seed the k-shot draw contains the j-shot draw
    for every j < k.
    """
    chosen = [p[torch.randperm(len(p), generator=generator)[:k]] for _, p in sorted(positions.items())]
    return _sorted_cat(chosen)


def _sorted_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if not parts:
        return torch.empty(0, dtype=torch.long)
    return torch.sort(torch.cat(parts)).values
