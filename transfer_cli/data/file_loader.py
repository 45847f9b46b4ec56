"""Images decoded one by one (files, or encoded images in a `datasets` table) by a torch DataLoader
with timm's transforms; an unreadable image becomes one clear error (or, with data.skip_bad_images, is
left out of its batch and counted), and each example's augmentation is seeded from (seed, epoch,
example index).
"""
from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Optional

import torch
from transfer_cli.data.common import first_line
from transfer_cli.data.epoch_order import Batch, BatchLoader, EpochOrder, batch_sizes
from transfer_cli.data.image_decode import DECODE_ERRORS, upright
from transfer_cli.data.splits import EncodedImages
from transfer_cli.errors import TransferCliError


class FileLoader(BatchLoader):
    """Encoded images decoded by a torch DataLoader with timm's transforms for the backbone."""

    def __init__(
        self,
        split: EncodedImages,
        prep: dict,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int,
        num_workers: int,
        skip_bad_images: bool = False,
    ):
        super().__init__(len(split), batch_size, shuffle=shuffle, seed=seed)
        self.augment = augment
        self.skip_bad_images = skip_bad_images
        self.skipped: dict[str, str] = {}  # image -> why it could not be read (data.skip_bad_images)
        files = ImageFiles(split, image_transform(prep, augment), image_mode(prep))
        batches = _PlanBatches(_PlanSampler(self.order, augment), batch_size)
        # Worker processes shut down promptly only when their DataLoader is freed by reference
        # counting; left to the garbage collector (a reference cycle, a traceback holding it) each
        # shutdown stalls for seconds. So nothing here refers back to self: the sampler shares
        # only the EpochOrder.
        self._new_dataloader = lambda: torch.utils.data.DataLoader(
            files,
            batch_sampler=batches,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            collate_fn=_collate_skipping if skip_bad_images else _collate,
        )
        self.loader = self._new_dataloader()

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if isinstance(batch, Unreadable):
                break
            for bad in batch.pop("skipped", ()):
                self._skip(bad)
            if len(batch["labels"]):
                yield batch
        else:
            return
        self.loader = self._new_dataloader()  # frees the old workers now, not when the error is collected
        raise TransferCliError(
            f"cannot read image {batch.path} ({batch.reason}); fix or remove the file, "
            "or set data.skip_bad_images=true to leave unreadable files out"
        )

    def _skip(self, bad: "Unreadable") -> None:
        """Say once per file that it is left out; `skipped` counts them for results.json."""
        if bad.path not in self.skipped:
            self.skipped[bad.path] = bad.reason
            print(f"transfer-cli: skipped unreadable image {bad.path} ({bad.reason}) (data.skip_bad_images=true)",
                  file=sys.stderr)


class _PlanSampler(torch.utils.data.Sampler):
    """Yields this epoch's (index, augmentation seed) pairs: the order follows from (seed, epoch), the seeds
    from (seed, epoch, example index)."""

    def __init__(self, order: EpochOrder, augment: bool):
        self.order = order
        self.augment = augment

    def __iter__(self) -> Iterator[tuple[int, Optional[int]]]:
        indices = self.order.indices(self.order.generator())
        if not self.augment:
            return iter([(i, None) for i in indices.tolist()])
        # a seed per example index, so that its augmentation does not depend on the order or the shard
        seeds = torch.randint(0, 2**62, (self.order.num_samples,), generator=self.order.augmentation_generator())
        return iter(zip(indices.tolist(), seeds[indices].tolist()))

    def __len__(self) -> int:
        return self.order.served


class _PlanBatches(torch.utils.data.Sampler):
    """Groups the plan's (index, seed) pairs into batches of `batch_sizes`."""

    def __init__(self, plan: _PlanSampler, batch_size: int):
        self.plan = plan
        self.batch_size = batch_size

    def _sizes(self) -> list[int]:
        return batch_sizes(len(self.plan), self.batch_size, training=self.plan.order.shuffle)

    def __iter__(self) -> Iterator[list[tuple[int, Optional[int]]]]:
        items = iter(self.plan)
        return iter([list(islice(items, size)) for size in self._sizes()])

    def __len__(self) -> int:
        return len(self._sizes())


@dataclass(frozen=True)
class Unreadable:
    """Stands in for a sample or batch whose image failed to decode.

    It travels back from worker processes as data, so the main process raises one clean
    TransferCliError instead of a worker traceback.
    """

    path: str
    reason: str


def image_transform(prep: dict, augment: bool) -> Callable:
    """timm's transform for the backbone's data config: training (random crop, flip, ...) or evaluation."""
    from timm.data import create_transform  # slow to import, and only decoded images need it

    return create_transform(
        input_size=tuple(prep["input_size"]),
        is_training=augment,
        interpolation=prep.get("interpolation", "bilinear"),
        mean=tuple(prep["mean"]),
        std=tuple(prep["std"]),
        crop_pct=prep.get("crop_pct"),
        crop_mode=prep.get("crop_mode"),
    )


def image_mode(prep: dict) -> str:
    """The PIL mode the backbone's channel count asks for."""
    return "L" if int(prep["input_size"][0]) == 1 else "RGB"


def decode(split: EncodedImages, index: int, mode: str) -> Any:
    """Example `index` as a PIL image in `mode`, or `Unreadable` when it cannot be decoded."""
    try:
        with split.open(index) as image:
            return upright(image, mode)
    except DECODE_ERRORS as e:
        return Unreadable(split.describe(index), first_line(e))


class ImageFiles(torch.utils.data.Dataset):
    """(index, augmentation seed) -> (transformed image, label), or `Unreadable`."""

    def __init__(self, split: EncodedImages, transform: Callable, mode: str):
        self.split = split
        self.labels = split.labels.tolist()
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, item: tuple[int, Optional[int]]) -> Any:
        index, seed = item
        image = decode(self.split, index, self.mode)
        if isinstance(image, Unreadable):
            return image
        with _seeded(seed):
            return self.transform(image), self.labels[index]


@contextmanager
def _seeded(seed: Optional[int]) -> Iterator[None]:
    """Seed the global RNGs that transforms draw from, restoring them afterwards.

    Seeding per example makes augmentation independent of worker count and of which worker
    runs the example, so it too is a pure function of (seed, epoch).
    """
    if seed is None:
        yield
        return
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(state)


def _collate(items: list) -> Any:
    bad = next((item for item in items if isinstance(item, Unreadable)), None)
    if bad is not None:
        return bad
    images, labels = zip(*items)
    return {"pixel_values": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long)}


def _collate_skipping(items: list) -> Any:
    """The batch without its unreadable files, which travel along under "skipped" (possibly all of them)."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    batch = _collate(good) if good else {"labels": torch.zeros(0, dtype=torch.long)}
    batch["skipped"] = [item for item in items if isinstance(item, Unreadable)]
    return batch
