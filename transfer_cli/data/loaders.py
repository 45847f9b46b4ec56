"""Batches for the training loop, built from raw splits with the backbone's own preprocessing.

In-memory splits (image arrays, tokenised text) are served by slicing tensors
(`data.tensor_batches`, augmented by `data.batch_augment`); image files and images kept encoded in a
`datasets` table go through a torch DataLoader with timm's transforms (`data.file_loader`). Either way the order follows
`data.epoch_order`: a pure function of (seed, epoch), so a resumed run sees exactly the batches the
interrupted one would have. `make_loader` picks the loader for a split; each is a `BatchLoader`.
"""
from __future__ import annotations

from typing import Any

from transfer_cli.data.epoch_order import BatchLoader
from transfer_cli.data.file_loader import FileLoader
from transfer_cli.data.splits import EncodedImageSplit, ImageArraySplit, ImageFileSplit, Split, TextSplit
from transfer_cli.data.tensor_batches import ImageArrayBatches, TensorLoader, TextBatches
from transfer_cli.errors import TransferCliError

__all__ = ["BatchLoader", "make_loader"]


def make_loader(
    split: Split,
    model: Any,
    batch_size: int,
    *,
    train: bool,
    seed: int,
    num_workers: int = 0,
    augment: bool = False,
    max_length: int = 128,
    skip_bad_images: bool = False,
) -> BatchLoader:
    """The loader for one split, preprocessed for `model` (anything with .modality and .preprocessing).

    `train` shuffles (per epoch, see BatchLoader.set_epoch) and, with `augment`, randomly augments
    images: image files with timm's full training transform, in-memory image arrays with its random
    resized crop and horizontal flip done on whole batches. Evaluation loaders are never augmented;
    text has no augmentation, so `augment` with a text split is an error rather than a silent no-op.
    `num_workers` and `skip_bad_images` (leave unreadable images out of their batches, counted in the
    loader's `skipped`, instead of stopping with an error) only matter for images decoded one by one
    (files, `datasets` tables).
    """
    expected = "text" if isinstance(split, TextSplit) else "image"
    if model.modality != expected:
        raise TransferCliError(
            f"the data holds {expected}s but the backbone is a {model.modality} model; "
            "pick a matching data= or backbone="
        )
    if batch_size < 1:
        raise TransferCliError(f"batch size {batch_size} must be at least 1")
    if augment and expected == "text":
        raise TransferCliError("data.augment=true, but text data has no augmentation here; set data.augment=false")
    prep = model.preprocessing
    if isinstance(split, (ImageFileSplit, EncodedImageSplit)):
        return FileLoader(split, prep, batch_size, shuffle=train, augment=train and augment, seed=seed,
                          num_workers=num_workers, skip_bad_images=skip_bad_images)
    if isinstance(split, ImageArraySplit):
        images = ImageArrayBatches(split, prep, augment=train and augment)
        draw = images.augmentation.draws if images.augmentation else None
        return TensorLoader(split.labels, images, batch_size, shuffle=train, seed=seed, draw=draw)
    text = TextBatches(split, prep["tokenizer"], max_length)
    return TensorLoader(split.labels, text, batch_size, shuffle=train, seed=seed)
