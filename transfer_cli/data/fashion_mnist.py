"""Fashion-MNIST from its IDX files on disk (e.g. Debian's dataset-fashion-mnist), never downloaded."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from transfer_cli.data.common import DATASETS, assemble, existing_dir
from transfer_cli.data.splits import DataBundle, ImageArraySplit
from transfer_cli.errors import TransferCliError

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


@DATASETS.register("fashion_mnist")
def fashion_mnist(cfg: DictConfig) -> DataBundle:
    """Fashion-MNIST (70,000 28x28 clothing images, 10 classes) from IDX files under data.root."""
    root = existing_dir(cfg.root, "root")
    train = _idx_pair(root, "train")
    test = _idx_pair(root, "t10k")
    return assemble(cfg, CLASS_NAMES, train, test=test)


def _idx_pair(root: Path, prefix: str) -> ImageArraySplit:
    images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise TransferCliError(
            f"{prefix} images {images.shape} and labels {labels.shape} in {root} do not match; "
            "re-install the Fashion-MNIST files"
        )
    return ImageArraySplit(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise TransferCliError(
        f"{name} (or {name}.gz) not found in {root}; set data.root to the folder holding the "
        "Fashion-MNIST IDX files (Debian: apt-get install dataset-fashion-mnist)"
    )


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = bytearray(f.read())  # writable, so torch.from_numpy shares it without a warning
    except (OSError, EOFError) as e:
        raise TransferCliError(f"cannot read {path} ({e}); re-install the file") from None
    # header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions,
    # then one big-endian int32 per dimension
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise TransferCliError(f"{path} is not an unsigned-byte IDX file; re-install the file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) >= header:
        shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
        if len(raw) == header + int(np.prod(shape)):
            return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)
    raise TransferCliError(f"{path} is truncated or corrupt; re-install the file")
