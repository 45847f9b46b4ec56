"""Raw dataset splits, before any backbone-specific preprocessing.

A data source returns splits of one of four kinds; the backbone's preprocessor (see
`transfer_cli.data.loaders`) turns them into batches. Keeping them raw lets the subset options
(few-shot, class subsets, stratified fractions) work the same way for every source.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence, Union

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

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, position: int) -> Any:
        """The PIL image of example `position` (not yet decoded: PIL decodes on first use)."""
        from PIL import Image

        return Image.open(self.paths[position])

    def describe(self, position: int) -> str:
        return str(self.paths[position])


@dataclass(frozen=True)
class EncodedImageSplit:
    """Images kept encoded in a `datasets` table (a column of {bytes, path}: PNG/JPEG bytes, or a file),
    decoded when batched, like image files; `rows` are this split's rows of the table."""

    table: Any  # datasets.Dataset with one column, cast to datasets.Image(decode=False)
    rows: tuple[int, ...]
    labels: torch.Tensor
    origin: str = ""  # the dataset and split, for error messages

    def select(self, index: torch.Tensor) -> "EncodedImageSplit":
        return replace(self, rows=tuple(self.rows[i] for i in index.tolist()), labels=self.labels[index])

    def __len__(self) -> int:
        return len(self.rows)

    def _record(self, position: int) -> dict:
        return self.table[self.rows[position]][self.table.column_names[0]]

    def open(self, position: int) -> Any:
        from PIL import Image

        record = self._record(position)
        return Image.open(io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"])

    def describe(self, position: int) -> str:
        path = self._record(position).get("path")
        return f"{path} (row {self.rows[position]} of {self.origin})" if path else f"row {self.rows[position]} of {self.origin}"


@dataclass(frozen=True)
class TextSplit:
    """Raw strings (one per example) with their labels; tokenised by the backbone's tokenizer."""

    texts: tuple[str, ...]
    labels: torch.Tensor

    def select(self, index: torch.Tensor) -> "TextSplit":
        return replace(self, texts=tuple(self.texts[i] for i in index.tolist()), labels=self.labels[index])


#: splits decoded image by image with timm's transforms (`data.file_loader`)
EncodedImages = Union[ImageFileSplit, EncodedImageSplit]
Split = Union[ImageArraySplit, ImageFileSplit, EncodedImageSplit, TextSplit]


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
