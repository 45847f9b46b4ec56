"""Batches sliced from in-memory splits (image arrays, tokenised text) with whole-batch tensor ops,
no per-example Python, preprocessed as the backbone expects.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from transfer_cli.data.batch_augment import RandomResizedCropFlip
from transfer_cli.data.epoch_order import Batch, BatchLoader, EpochOrder
from transfer_cli.data.splits import ImageArraySplit, TextSplit
from transfer_cli.errors import TransferCliError

#: resized splits up to this size are resized once at construction instead of per batch
PRERESIZE_BYTES = 200 * 2**20

# timm / PIL interpolation names -> torch.nn.functional.interpolate modes
_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "area": "area",
          "box": "area", "lanczos": "bicubic", "hamming": "bilinear"}


class TensorLoader(BatchLoader):
    """Serves slices of an in-memory split: `make_batch(index)` builds a whole batch at once.

    With `draw` the examples are augmented: each epoch `draw(order)` gives one row of random numbers
    per example, and `make_batch(index, rows)` gets the batch's rows, picked by example index.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        make_batch: Callable[..., Batch],
        batch_size: int,
        *,
        shuffle: bool,
        seed: int,
        draw: Optional[Callable[[EpochOrder], torch.Tensor]] = None,
    ):
        super().__init__(len(labels), batch_size, shuffle=shuffle, seed=seed)
        self.labels = labels.long()
        self.make_batch = make_batch
        self.draw = draw
        self.augment = draw is not None

    def __iter__(self) -> Iterator[Batch]:
        draws = self.draw(self.order) if self.draw else None
        for index in self.batch_indices():
            extra = () if draws is None else (draws[index],)
            yield {**self.make_batch(index, *extra), "labels": self.labels[index]}


class ImageArrayBatches:
    """uint8 N x C x H x W images -> normalised float batches of the backbone's input size."""

    def __init__(self, split: ImageArraySplit, prep: dict, augment: bool = False):
        self.channels, height, width = (int(d) for d in prep["input_size"])
        self.size = (height, width)
        self.mode = _MODES.get(str(prep.get("interpolation", "bilinear")), "bilinear")
        n, c = split.images.shape[:2]
        if c != self.channels and (c, self.channels) not in ((1, 3), (3, 1)):
            raise TransferCliError(
                f"images have {c} channels but the backbone takes {self.channels}; use a matching backbone"
            )
        mean = torch.tensor(prep["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(prep["std"], dtype=torch.float32).view(1, -1, 1, 1)
        # (x / 255 - mean) / std as one multiply-add
        self.scale, self.shift = 1.0 / (255.0 * std), -mean / std
        self.images = split.images
        self.augmentation = RandomResizedCropFlip(split.images.shape[-2:]) if augment else None
        if n and split.images.shape[-2:] != self.size and n * c * height * width <= PRERESIZE_BYTES:
            self.images = torch.cat([self._resize(chunk) for chunk in split.images.split(1024)])

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        """Resize uint8 images, rounding back to uint8 so per-batch and up-front resizing agree exactly."""
        if images.shape[-2:] == self.size:
            return images
        antialias = self.mode in ("bilinear", "bicubic")  # the modes that take it; it matters when shrinking
        out = F.interpolate(images.float(), size=self.size, mode=self.mode, antialias=antialias)
        return out.round_().clamp_(0, 255).to(torch.uint8)

    def __call__(self, index: torch.Tensor, draws: Optional[torch.Tensor] = None) -> Batch:
        images = self._resize(self.images[index]).float()
        if draws is not None:
            images = self.augmentation(images, draws)
        if images.shape[1] == 1 and self.channels == 3:
            images = images.expand(-1, 3, -1, -1)
        elif images.shape[1] == 3 and self.channels == 1:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as PIL's convert("L")
            images = (images * luma).sum(1, keepdim=True)
        return {"pixel_values": images * self.scale + self.shift}


class TextBatches:
    """Texts tokenised once up front; each batch is trimmed to its longest sequence."""

    def __init__(self, split: TextSplit, tokenizer: Any, max_length: int):
        # an empty split still gets its columns (of zero rows): tokenizers reject an empty list
        encoded = tokenizer(list(split.texts) or [""], padding="max_length", truncation=True,
                            max_length=max_length, return_tensors="pt")
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
        self.columns = {k: encoded[k][:len(split.texts)] for k in keys}
        self.lengths = self.columns["attention_mask"].sum(1)
        self.left_padded = getattr(tokenizer, "padding_side", "right") == "left"

    def __call__(self, index: torch.Tensor) -> Batch:
        longest = int(self.lengths[index].max())
        cut = slice(-longest, None) if self.left_padded else slice(0, longest)
        return {k: v[index][:, cut] for k, v in self.columns.items()}
