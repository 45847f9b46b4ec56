"""What every data source shares: the DATASETS registry and carving of the splits a source lacks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig

from transfer_cli.data.sampling import stratified_split
from transfer_cli.data.splits import DataBundle, Split
from transfer_cli.errors import TransferCliError
from transfer_cli.registry import Registry

#: config `data.name` -> function(cfg) -> DataBundle
DATASETS: Registry[DataBundle] = Registry("dataset")


def assemble(
    cfg: DictConfig,
    class_names: Sequence[str],
    train: Split,
    val: Optional[Split] = None,
    test: Optional[Split] = None,
) -> DataBundle:
    """A DataBundle, carving a missing test split and then a missing val split out of train.

    The carving is stratified and seeded by `data.split_seed`, not the run seed, so every run of an
    experiment validates and tests on the same examples.
    """
    generator = torch.Generator().manual_seed(int(cfg.split_seed))
    carved = tuple(split for split, given in (("test", test), ("val", val)) if given is None)
    if test is None:
        train, test = _carve(train, cfg.test_fraction, "test_fraction", generator)
    if val is None:
        train, val = _carve(train, cfg.val_fraction, "val_fraction", generator)
    return DataBundle(train=train, val=val, test=test, class_names=tuple(class_names), carved=carved)


def _carve(split: Split, fraction: float, key: str, generator: torch.Generator) -> tuple[Split, Split]:
    if not 0 <= fraction < 1:
        raise TransferCliError(f"data.{key}={fraction} must be in [0, 1); e.g. data.{key}=0.2")
    rest, taken = stratified_split(split.labels, fraction, generator)
    return split.select(rest), split.select(taken)


def existing_dir(path: str, key: str) -> Path:
    """`path` (with ~ expanded) as a folder that must exist; else a one-line error naming the key."""
    folder = Path(os.path.expanduser(str(path)))
    if not folder.is_dir():
        raise TransferCliError(f"data folder {folder} does not exist; set data.{key}=<folder>")
    return folder


def first_line(error: Exception) -> str:
    """An exception's message cut to one line, for quoting inside a TransferCliError."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
