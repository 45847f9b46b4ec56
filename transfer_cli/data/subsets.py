"""The subset options, applied after loading on every dataset: classes, train_fraction, samples_per_class.

The class subset touches every split; the two train subsamplers are seeded by the *run* seed, so
each seed is a different few-shot draw while val and test stay whole and identical across runs.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence, Union

import torch

from transfer_cli.data.sampling import class_indices, per_class_draw, stratified_split
from transfer_cli.data.splits import DataBundle, Split
from transfer_cli.errors import TransferCliError


def apply_subsets(
    bundle: DataBundle,
    *,
    classes: Optional[Sequence[Union[str, int]]],
    train_fraction: Optional[float],
    samples_per_class: Optional[int],
    seed: int,
) -> DataBundle:
    """Apply the options in order: class subset, then train_fraction, then samples_per_class."""
    if classes is not None:
        bundle = select_classes(bundle, classes)
    generator = torch.Generator().manual_seed(seed)
    if train_fraction is not None:
        bundle = replace(bundle, train=subsample_fraction(bundle.train, train_fraction, generator))
    if samples_per_class is not None:
        bundle = replace(
            bundle, train=few_shot(bundle.train, samples_per_class, bundle.class_names, generator)
        )
    return bundle


def select_classes(bundle: DataBundle, classes: Sequence[Union[str, int]]) -> DataBundle:
    """Keep only `classes` (names or indices) in every split, relabelled 0..n-1 in the given order."""
    names = bundle.class_names
    chosen = [_class_position(c, names) for c in classes]
    if not chosen:
        raise TransferCliError("data.classes is empty; list at least one class or set data.classes=null")
    if len(set(chosen)) != len(chosen):
        raise TransferCliError(f"data.classes names a class twice: {list(classes)}; list each class once")
    new_label = torch.full((len(names),), -1, dtype=torch.long)
    new_label[chosen] = torch.arange(len(chosen))

    def relabel(split: Split) -> Split:
        mapped = new_label[split.labels]
        kept = split.select(torch.nonzero(mapped >= 0).flatten())
        return replace(kept, labels=mapped[mapped >= 0])

    return replace(
        bundle,
        train=relabel(bundle.train),
        val=relabel(bundle.val),
        test=relabel(bundle.test),
        class_names=tuple(names[i] for i in chosen),
    )


def _class_position(wanted: Union[str, int], names: Sequence[str]) -> int:
    if isinstance(wanted, int) and not isinstance(wanted, bool):
        if 0 <= wanted < len(names):
            return wanted
    elif str(wanted) in names:
        return names.index(str(wanted))
    raise TransferCliError(
        f"data.classes: no class {wanted!r}; valid names (or indices 0..{len(names) - 1}): {', '.join(names)}"
    )


def subsample_fraction(split: Split, fraction: float, generator: torch.Generator) -> Split:
    """A stratified `fraction` of the split (every class keeps at least one example)."""
    if not 0 < fraction <= 1:
        raise TransferCliError(
            f"data.train_fraction={fraction} must be in (0, 1]; e.g. data.train_fraction=0.1"
        )
    if fraction == 1:
        return split
    kept, _ = stratified_split(split.labels, 1 - fraction, generator)
    return split.select(kept)


def few_shot(split: Split, k: int, class_names: Sequence[str], generator: torch.Generator) -> Split:
    """Exactly k random training examples of every class."""
    if k < 1:
        raise TransferCliError(f"data.samples_per_class={k} must be at least 1, or null for all examples")
    positions = class_indices(split.labels)
    for label, name in enumerate(class_names):
        have = len(positions.get(label, ()))
        if have < k:
            raise TransferCliError(
                f"class {name!r} has {have} training examples, fewer than data.samples_per_class={k}; "
                "lower it or leave the class out with data.classes"
            )
    return split.select(per_class_draw(positions, k, generator))
