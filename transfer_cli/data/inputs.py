"""New inputs for a trained run (`transfer-cli predict`), read and batched the way its test split was.

An image file, a folder of images (searched recursively) or a CSV / JSONL file of texts becomes
batches preprocessed exactly as the run's test split: image files and encoded images through the
backbone's evaluation transform, images of in-memory datasets (digits, Fashion-MNIST) resized as
those arrays are, texts tokenised by the run's tokenizer. An input that cannot be read (an image
that does not decode, a row without text) is recorded as `Unreadable` and the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from transfer_cli.data.file_loader import Unreadable, decode, image_mode, image_transform
from transfer_cli.data.imagefolder import image_files
from transfer_cli.data.splits import DataBundle, ImageArraySplit, ImageFileSplit, TextSplit
from transfer_cli.data.tensor_batches import ImageArrayBatches, TextBatches
from transfer_cli.data.text import read_rows
from transfer_cli.errors import TransferCliError

TEXT_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")


@dataclass
class Inputs:
    """Named inputs in chunks of `batch_size`: iterate for (names, batch) pairs; `unreadable` fills as
    the inputs are read (texts: at once; images: as each is decoded)."""

    names: list[str]
    make_batch: Callable[[list[int]], tuple[list[int], dict[str, torch.Tensor]]]
    batch_size: int
    unreadable: list[Unreadable]

    def __len__(self) -> int:
        return -(-len(self.names) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        for start in range(0, len(self.names), self.batch_size):
            kept, batch = self.make_batch(list(range(start, min(start + self.batch_size, len(self.names)))))
            if kept:
                yield [self.names[i] for i in kept], batch


def read_inputs(source: Path, model: Any, data: DataBundle, text_column: str, max_length: int,
                batch_size: int) -> Inputs:
    """`source` for `model` (its modality and preprocessing), preprocessed like `data`'s test split."""
    if not source.exists():
        raise TransferCliError(f"input={source} does not exist; give an image, a folder of images or a CSV/JSONL of texts")
    if model.modality == "text":
        return _texts(source, model.preprocessing["tokenizer"], text_column, max_length, batch_size)
    if source.is_file() and source.suffix.lower() in TEXT_SUFFIXES:
        raise TransferCliError(f"input={source} is a table of texts, but this run's backbone is an image model; "
                               "give an image or a folder of images")
    paths = image_files(source) if source.is_dir() else [source]
    if not paths:
        raise TransferCliError(f"no image files under {source}; give an image or a folder of images")
    if isinstance(data.test, ImageArraySplit):  # in-memory images: decoded with their channel count, resized as arrays
        channels = int(data.test.images.shape[1])
        return _images(paths, "L" if channels == 1 else "RGB", lambda image: _like_arrays(image, model.preprocessing),
                       batch_size)
    return _images(paths, image_mode(model.preprocessing), image_transform(model.preprocessing, augment=False),
                   batch_size)


def _images(paths: list[Path], mode: str, to_tensor: Callable[[Any], torch.Tensor], batch_size: int) -> Inputs:
    """Each image decoded in `mode` (PIL), then `to_tensor` (C x H x W); undecodable ones recorded."""
    split = ImageFileSplit(tuple(paths), torch.zeros(len(paths), dtype=torch.long))
    unreadable: list[Unreadable] = []

    def make_batch(positions: list[int]) -> tuple[list[int], dict[str, torch.Tensor]]:
        kept, images = [], []
        for position in positions:
            image = decode(split, position, mode)
            if isinstance(image, Unreadable):
                unreadable.append(image)
                continue
            kept.append(position)
            images.append(to_tensor(image))
        return kept, {"pixel_values": torch.stack(images)} if images else {}

    return Inputs([str(p) for p in paths], make_batch, batch_size, unreadable)


def _like_arrays(image: Any, prep: dict) -> torch.Tensor:
    """A PIL image preprocessed as the uint8 arrays of an in-memory dataset are (`ImageArrayBatches`)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).reshape(image.height, image.width, -1)
    one = ImageArraySplit(pixels.permute(2, 0, 1)[None], torch.zeros(1, dtype=torch.long))
    return ImageArrayBatches(one, prep)(torch.zeros(1, dtype=torch.long))["pixel_values"][0]


def _texts(source: Path, tokenizer: Any, column: str, max_length: int, batch_size: int) -> Inputs:
    if not (source.is_file() and source.suffix.lower() in TEXT_SUFFIXES):
        raise TransferCliError(f"input={source}: this run's backbone is a text model; give a CSV or JSONL file "
                               f"with a {column!r} column")
    skipped: list[tuple[int, str]] = []
    rows = read_rows(source, "input", skipped)
    if rows and not any(isinstance(r, dict) and column in r for r in rows):
        raise TransferCliError(f"{source} has no {column!r} column (columns: {', '.join(rows[0])}); "
                               "name the column with column=<name>")
    unreadable = [Unreadable(f"line {number} of {source}", reason) for number, reason in skipped]
    texts: list[str] = []
    for number, row in enumerate(rows, 1):
        text = row.get(column) if isinstance(row, dict) else None
        if text is None or not str(text).strip():
            unreadable.append(Unreadable(f"row {number} of {source}", f"no text in column {column!r}"))
        else:
            texts.append(str(text))
    batches = TextBatches(TextSplit(tuple(texts), torch.zeros(len(texts), dtype=torch.long)), tokenizer, max_length)

    def make_batch(positions: list[int]) -> tuple[list[int], dict[str, torch.Tensor]]:
        return positions, batches(torch.tensor(positions))

    return Inputs(texts, make_batch, batch_size, unreadable)
