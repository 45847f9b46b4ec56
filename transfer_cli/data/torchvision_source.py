"""Any torchvision classification dataset, turned into the raw splits the rest of the data layer uses."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from transfer_cli.data.common import DATASETS, assemble, first_line
from transfer_cli.data.splits import DataBundle, ImageArraySplit, ImageFileSplit, Split
from transfer_cli.errors import TransferCliError

# split= values tried, in order, for datasets that take `split` instead of `train`
TRAIN_SPLITS = ("train", "trainval")
VAL_SPLITS = ("val", "valid")
TEST_SPLITS = ("test",)


@DATASETS.register("torchvision")
def torchvision_dataset(cfg: DictConfig) -> DataBundle:
    """Any torchvision classification dataset by class name (e.g. CIFAR10, Flowers102) under data.root."""
    cls = _dataset_class(cfg.dataset)
    root = Path(os.path.expanduser(str(cfg.root)))
    if not cfg.download and not root.is_dir():
        raise TransferCliError(
            f"data folder {root} does not exist; set data.root to the folder holding {cfg.dataset} "
            "or data.download=true"
        )
    params = inspect.signature(cls).parameters

    def make(**kwargs: Any) -> torch.utils.data.Dataset:
        if "download" in params:
            kwargs["download"] = bool(cfg.download)
        try:
            return cls(str(root), **kwargs)
        except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
            how = "check the network and data.root" if cfg.download else "set data.download=true or data.root"
            raise TransferCliError(f"{cfg.dataset} not loaded from {root} ({first_line(e)}); {how}") from None

    if "train" in params:
        train, val, test = make(train=True), None, make(train=False)
    elif "split" in params:
        train = _first_split(make, TRAIN_SPLITS)
        if train is None:
            raise TransferCliError(
                f"{cfg.dataset} has no split named {' or '.join(TRAIN_SPLITS)}; use data=imagefolder"
            )
        val, test = _first_split(make, VAL_SPLITS), _first_split(make, TEST_SPLITS)
    else:
        train, val, test = make(), None, None
    splits = [None if ds is None else to_split(ds) for ds in (train, val, test)]
    return assemble(cfg, _class_names(train, splits[0].labels), *splits)


def _dataset_class(name: str) -> type:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.utils.data.Dataset)):
        raise TransferCliError(
            f"torchvision.datasets has no dataset {name!r}; "
            "set data.dataset to one of its classes, e.g. CIFAR10"
        )
    return cls


def _first_split(make: Callable[..., Any], names: Sequence[str]) -> Optional[torch.utils.data.Dataset]:
    """The dataset built with the first split name it accepts (torchvision rejects others with ValueError)."""
    for name in names:
        try:
            return make(split=name)
        except ValueError:
            continue
    return None


def to_split(ds: Any) -> Split:
    """In-memory arrays when the dataset holds them, else file paths, else decoded images stacked."""
    data, labels = getattr(ds, "data", None), _attr(ds, ("targets", "labels", "_labels"))
    if labels is not None and _is_uint8_images(data):
        return ImageArraySplit(_nchw(torch.as_tensor(data)), _long(labels))
    pairs = _attr(ds, ("samples", "_samples", "imgs"))
    if pairs is not None and len(pairs) and isinstance(pairs[0][0], (str, os.PathLike)):
        return ImageFileSplit(tuple(Path(p) for p, _ in pairs), _long([y for _, y in pairs]))
    files = _attr(ds, ("_image_files", "_images"))
    if files is not None and labels is not None:
        return ImageFileSplit(tuple(Path(p) for p in files), _long(labels))
    return _materialise(ds)


def _materialise(ds: Any) -> ImageArraySplit:
    """Decode every example once; only possible when all images share one size."""
    images, labels = [], []
    for i in range(len(ds)):
        image, label = ds[i]
        images.append(np.asarray(image.convert("L" if image.mode in ("1", "L", "I", "F") else "RGB")))
        labels.append(int(label))
    if len({a.shape for a in images}) > 1:
        raise TransferCliError(
            f"{type(ds).__name__} images differ in size and the dataset lists no files; "
            "save them as class folders and use data=imagefolder"
        )
    return ImageArraySplit(_nchw(torch.from_numpy(np.stack(images))), _long(labels))


def _attr(ds: Any, names: Sequence[str]) -> Any:
    return next((getattr(ds, n) for n in names if getattr(ds, n, None) is not None), None)


def _is_uint8_images(data: Any) -> bool:
    arrays = (np.ndarray, torch.Tensor)
    return isinstance(data, arrays) and data.ndim in (3, 4) and str(data.dtype).endswith("uint8")


def _nchw(images: torch.Tensor) -> torch.Tensor:
    """N x H x W, N x H x W x C or N x C x H x W (C = 1 or 3) -> contiguous N x C x H x W."""
    if images.ndim == 3:
        return images.unsqueeze(1).contiguous()
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        return images.permute(0, 3, 1, 2).contiguous()
    return images.contiguous()


def _long(labels: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _class_names(ds: Any, labels: torch.Tensor) -> list[str]:
    """The dataset's `classes` when it has one per label, else the label numbers."""
    count = int(labels.max()) + 1 if len(labels) else 0
    classes = getattr(ds, "classes", None)
    if classes is not None and len(classes) >= count:
        return [str(c) for c in classes]
    return [str(i) for i in range(count)]

