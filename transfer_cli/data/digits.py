"""scikit-learn's bundled 8x8 digits: a real dataset that needs no download and no disk.

The file is read straight from scikit-learn's package folder, the way `sklearn.datasets.load_digits`
reads it, without importing scikit-learn: its import pulls in scipy and pandas, seconds of a
run's start-up (tests/test_data.py holds the two readings equal).
"""
from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from transfer_cli.data.common import DATASETS, assemble
from transfer_cli.data.splits import DataBundle, ImageArraySplit
from transfer_cli.errors import TransferCliError


@DATASETS.register("digits")
def digits(cfg: DictConfig) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), offline; fixed test split."""
    with gzip.open(digits_file(), mode="rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")  # one row per image: 64 pixels, then the digit
    # pixel values are 0..16 ink counts; 16 -> 255 gives ordinary 8-bit images
    pixels = np.rint(table[:, :-1].reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    names = [str(c) for c in range(10)]
    return assemble(cfg, names, ImageArraySplit(images, labels))


def digits_file() -> Path:
    """scikit-learn's digits.csv.gz, located without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if path is None or not path.is_file():
        raise TransferCliError("data=digits reads the digits bundled with scikit-learn; pip install scikit-learn")
    return path
