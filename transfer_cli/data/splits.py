"""Raw dataset splits, before any backbone-specific preprocessing.

A data source returns splits of one of three kinds; the backbone's preprocessor (see
`transfer_cli.data.loaders`) turns them into batches. Keeping them raw lets the subset options
(few-shot, class subsets, stratified fractions) work the same way for every source.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence, Union

import torch


@dataclass(frozen=True)
class ImageArraySplit:
    """Images held in memory: uint8 tensor N x C x H x W (C = 1 or 3), labels N."""

    images: torch.Tensor
    labels: torch.Tensor

    def select(self, index: torch.Tensor) -> "ImageArraySplit":
        return replace(self, images=self.images[index], labels=self.labels[index])


@dataclass(frozen=True)
class ImageFileSplit:
    """Images on disk, decoded when batched (in DataLoader worker processes)."""

    paths: tuple[Path, ...]
    labels: torch.Tensor

    def select(self, index: torch.Tensor) -> "ImageFileSplit":
        return replace(self, paths=tuple(self.paths[i] for i in index.tolist()), labels=self.labels[index])


@dataclass(frozen=True)
class TextSplit:
    """Raw strings (one per example) with their labels; tokenised by the backbone's tokenizer."""

    texts: tuple[str, ...]
    labels: torch.Tensor

    def select(self, index: torch.Tensor) -> "TextSplit":
        return replace(self, texts=tuple(self.texts[i] for i in index.tolist()), labels=self.labels[index])


Split = Union[ImageArraySplit, ImageFileSplit, TextSplit]


@dataclass(frozen=True)
class DataBundle:
    """train / val / test splits of one dataset, and its class names (their count is the head size)."""

    train: Split
    val: Split
    test: Split
    class_names: tuple[str, ...] = field(default_factory=tuple)
    #: the splits carved out of train (data.val_fraction, data.test_fraction) rather than given
    carved: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
