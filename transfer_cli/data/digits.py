"""scikit-learn's bundled 8x8 digits: a real dataset that needs no download and no disk."""
from __future__ import annotations

import numpy as np
import torch
from omegaconf import DictConfig

from transfer_cli.data.common import DATASETS, assemble
from transfer_cli.data.splits import DataBundle, ImageArraySplit


@DATASETS.register("digits")
def digits(cfg: DictConfig) -> DataBundle:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), offline; fixed test split."""
    from sklearn.datasets import load_digits

    raw = load_digits()
    # pixel values are 0..16 ink counts; 16 -> 255 gives ordinary 8-bit images
    pixels = np.rint(raw.images * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    labels = torch.from_numpy(raw.target.astype(np.int64))
    names = [str(c) for c in raw.target_names]
    return assemble(cfg, names, ImageArraySplit(images, labels))
