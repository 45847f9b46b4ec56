"""A hand-built TransferModel small enough to check formulas by hand."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from transfer_cli.backbones.model import TransferModel


PREPROCESSING = {"input_size": (3, 8, 8), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
                 "crop_pct": 1.0}


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


def source_classifier(classes: int, width: int) -> dict:
    """A made-up source task's linear classifier ({} for none), drawn after the model's own layers."""
    return {"weight": torch.randn(classes, width), "bias": torch.randn(classes)} if classes else {}


class ToyModel(TransferModel):
    """stem (conv + BN) -> block (conv + BN) -> pool -> head; image modality. `source_classes` > 0 gives it a
    source classifier of that many classes (Co-Tuning, LwF)."""

    def __init__(self, num_classes: int = 3, width: int = 4, source_classes: int = 0):
        body = nn.Module()
        body.stem = conv_block(3, width)
        body.block = conv_block(width, width)
        head = nn.Linear(width, num_classes)
        super().__init__(
            body=body,
            head=head,
            group_modules={"stem": [body.stem], "block": [body.block]},
            block_names=["body.block"],
            feature_dim=width,
            modality="image",
            preprocessing=PREPROCESSING,
            source_classifier=source_classifier(source_classes, width),
        )

    def features(self, batch):
        x = self.body.block(self.body.stem(batch["pixel_values"]))
        return x.mean(dim=(2, 3))


class ToyChain(TransferModel):
    """stem -> `blocks` residual conv blocks (each its own group) -> pool -> head: blocks to alternate."""

    def __init__(self, num_classes: int = 3, width: int = 4, blocks: int = 3):
        body = nn.Module()
        body.stem = conv_block(3, width)
        body.blocks = nn.Sequential(*[conv_block(width, width) for _ in range(blocks)])
        super().__init__(
            body=body,
            head=nn.Linear(width, num_classes),
            group_modules={"stem": [body.stem], **{f"block{i}": [b] for i, b in enumerate(body.blocks)}},
            block_names=[f"body.blocks.{i}" for i in range(blocks)],
            feature_dim=width,
            modality="image",
            preprocessing=PREPROCESSING,
        )

    def features(self, batch):
        x = self.body.stem(batch["pixel_values"])
        for block in self.body.blocks:
            x = x + block(x)
        return x.mean(dim=(2, 3))


class ToyLoader:
    """Random images with learnable labels; an epoch's order depends only on (seed, epoch)."""

    def __init__(self, n: int = 24, batch_size: int = 8, seed: int = 0, shuffle: bool = True):
        g = torch.Generator().manual_seed(1234)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.labels = (self.images[:, 0].mean(dim=(1, 2)) > 0).long()
        self.batch_size, self.seed, self.shuffle, self.epoch = batch_size, seed, shuffle, 0
        self.num_samples = n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def batch_indices(self):
        """Each batch's example positions, in the order `__iter__` serves them (as the real loaders)."""
        if self.shuffle:
            order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        else:
            order = torch.arange(self.num_samples)
        return iter(order.split(self.batch_size))

    @contextmanager
    def stored_order(self):
        shuffle, self.shuffle = self.shuffle, False
        try:
            yield
        finally:
            self.shuffle = shuffle

    def __iter__(self):
        for idx in self.batch_indices():
            yield {"pixel_values": self.images[idx], "labels": self.labels[idx]}


def toy_config(**trainer):
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "seed": 0,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
                  "head_lr_mult": 1.0, "layer_decay": 1.0},
        "sched": {"name": "cosine", "warmup_epochs": 0, "min_lr_ratio": 0.0},
        "trainer": {"max_epochs": 3, "device": "cpu", "precision": "auto", "channels_last": "auto", "compile": False, "cudnn_benchmark": True,
                    "grad_clip": None, "resume": False, "early_stopping_patience": None, "max_train_batches": None,
                    "max_val_batches": None, "max_test_batches": None, "val_every": 1, "progress": False, "log_every": 1,
                    "num_threads": None, "select_by": "acc1", **trainer},
    })


#: metrics.jsonl fields that measure wall-clock time: they differ between otherwise identical runs
TIMING_KEYS = frozenset({"epoch_time_s", "train_samples_per_s", "val_time_s"})


def without_timing(records):
    """metrics.jsonl records without their wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
