"""Batches for the training loop, built from raw splits with the backbone's own preprocessing.

In-memory splits (image arrays, tokenised text) are served by slicing tensors with whole-batch
tensor ops, with no per-example Python; image files go through a torch DataLoader with timm's
transforms. Either way a training epoch's order is a pure function of (seed, epoch), and an
example's augmentation one of (seed, epoch, example index), so a resumed run sees exactly the
batches the interrupted one would have, whatever the batch size, worker count or sharding.
"""
from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from transfer_cli.data.common import first_line
from transfer_cli.data.splits import ImageArraySplit, ImageFileSplit, Split, TextSplit
from transfer_cli.errors import TransferCliError

Batch = dict[str, torch.Tensor]

#: resized splits up to this size are resized once at construction instead of per batch
PRERESIZE_BYTES = 200 * 2**20

# timm / PIL interpolation names -> torch.nn.functional.interpolate modes
_MODES = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "area": "area",
          "box": "area", "lanczos": "bicubic", "hamming": "bilinear"}


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
) -> "BatchLoader":
    """The loader for one split, preprocessed for `model` (anything with .modality and .preprocessing).

    `train` shuffles (per epoch, see BatchLoader.set_epoch) and, with `augment`, randomly augments
    images: image files with timm's full training transform, in-memory image arrays with its random
    resized crop and horizontal flip done on whole batches. Evaluation loaders are never augmented;
    text has no augmentation, so `augment` with a text split is an error rather than a silent no-op.
    `num_workers` only matters for image files.
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
    if isinstance(split, ImageFileSplit):
        return FileLoader(split, prep, batch_size, shuffle=train, augment=train and augment, seed=seed,
                          num_workers=num_workers)
    if isinstance(split, ImageArraySplit):
        images = _ImageArrayBatches(split, prep, augment=train and augment)
        draw = images.augmentation.draws if images.augmentation else None
        return TensorLoader(split.labels, images, batch_size, shuffle=train, seed=seed, draw=draw)
    text = _TextBatches(split, prep["tokenizer"], max_length)
    return TensorLoader(split.labels, text, batch_size, shuffle=train, seed=seed)


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


class _ImageArrayBatches:
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
        self.augmentation = _RandomResizedCropFlip(split.images.shape[-2:]) if augment else None
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


class _RandomResizedCropFlip:
    """timm's training crop and flip for whole float batches: one affine_grid + grid_sample, no per-example
    Python, no PIL.

    As timm's RandomResizedCropAndInterpolation with its defaults: a crop whose area is uniform in SCALE
    of the source image's, with aspect ratio log-uniform in RATIO, the first of TRIES candidates that
    fits in the image (all tried at once), else timm's fallback, the centred crop of the image's aspect
    ratio clamped into RATIO; its position is uniform. Then a horizontal flip with probability FLIP.
    Crop sizes are fractions of the source's size (timm rounds them to pixels). The crop is sampled
    bilinearly from the image already resized to the model's input size: the resize scales each axis,
    so a crop's fractions are the same on both.
    """

    SCALE = (0.08, 1.0)
    RATIO = (3 / 4, 4 / 3)
    TRIES = 10
    FLIP = 0.5
    #: uniform draws per example: TRIES (area, log ratio) pairs, then the crop's x and y and the flip
    DRAWS = 2 * TRIES + 3

    def __init__(self, source_size: tuple[int, int]):
        height, width = source_size
        self.aspect = width / height

    def draws(self, order: EpochOrder) -> torch.Tensor:
        """One row of uniforms per example index for the order's (seed, epoch)."""
        return torch.rand(order.num_samples, self.DRAWS, generator=order.augmentation_generator())

    def __call__(self, images: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
        grid = F.affine_grid(self._theta(draws), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _theta(self, draws: torch.Tensor) -> torch.Tensor:
        """Per example the affine map from output to source coordinates (both in [-1, 1])."""
        tries = self.TRIES
        area = self.SCALE[0] + (self.SCALE[1] - self.SCALE[0]) * draws[:, :tries]
        low, high = math.log(self.RATIO[0]), math.log(self.RATIO[1])
        ratio = torch.exp(low + (high - low) * draws[:, tries:2 * tries])
        # crop width and height as fractions of the source's: w*h = area*W*H and w/h = ratio
        width, height = (area * ratio / self.aspect).sqrt(), (area / ratio * self.aspect).sqrt()
        fits = (width <= 1) & (height <= 1)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax gives the first of equal maxima
        found = fits.any(1)
        fallback_w = min(1.0, self.RATIO[1] / self.aspect)
        fallback_h = min(1.0, self.aspect / self.RATIO[0])
        width = torch.where(found, width.gather(1, first)[:, 0], fallback_w)
        height = torch.where(found, height.gather(1, first)[:, 0], fallback_h)
        # a uniform position puts the crop's centre uniformly in [-(1 - size), 1 - size]; the fallback is centred
        shift = torch.where(found[:, None], 2 * draws[:, 2 * tries:2 * tries + 2] - 1, 0.0)
        flip = torch.where(draws[:, -1] < self.FLIP, -1.0, 1.0)
        theta = torch.zeros(len(draws), 2, 3)
        theta[:, 0, 0] = width * flip
        theta[:, 0, 2] = (1 - width) * shift[:, 0]
        theta[:, 1, 1] = height
        theta[:, 1, 2] = (1 - height) * shift[:, 1]
        return theta


class _TextBatches:
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


class FileLoader(BatchLoader):
    """Image files decoded by a torch DataLoader with timm's transforms for the backbone."""

    def __init__(
        self,
        split: ImageFileSplit,
        prep: dict,
        batch_size: int,
        *,
        shuffle: bool,
        augment: bool,
        seed: int,
        num_workers: int,
    ):
        super().__init__(len(split.paths), batch_size, shuffle=shuffle, seed=seed)
        self.augment = augment
        from timm.data import create_transform  # slow to import, and only image files need it

        transform = create_transform(
            input_size=tuple(prep["input_size"]),
            is_training=augment,
            interpolation=prep.get("interpolation", "bilinear"),
            mean=tuple(prep["mean"]),
            std=tuple(prep["std"]),
            crop_pct=prep.get("crop_pct"),
            crop_mode=prep.get("crop_mode"),
        )
        files = _ImageFiles(split, transform, "L" if int(prep["input_size"][0]) == 1 else "RGB")
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
            collate_fn=_collate,
        )
        self.loader = self._new_dataloader()

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            if isinstance(batch, _Unreadable):
                break
            yield batch
        else:
            return
        self.loader = self._new_dataloader()  # frees the old workers now, not when the error is collected
        raise TransferCliError(
            f"cannot read image {batch.path} ({batch.reason}); fix or remove the file"
        )


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
class _Unreadable:
    """Stands in for a sample or batch whose image failed to decode.

    It travels back from worker processes as data, so the main process raises one clean
    TransferCliError instead of a worker traceback.
    """

    path: str
    reason: str


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, split: ImageFileSplit, transform: Callable, mode: str):
        self.paths = split.paths
        self.labels = split.labels.tolist()
        self.transform = transform
        self.mode = mode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, Optional[int]]) -> Any:
        index, seed = item
        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            return _Unreadable(str(path), first_line(e))
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
    bad = next((item for item in items if isinstance(item, _Unreadable)), None)
    if bad is not None:
        return bad
    images, labels = zip(*items)
    return {"pixel_values": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long)}
