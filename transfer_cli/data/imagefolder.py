"""Images on disk, one sub-folder per class (the torchvision ImageFolder layout)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from omegaconf import DictConfig

from transfer_cli.data.common import DATASETS, assemble, existing_dir
from transfer_cli.data.splits import DataBundle, ImageFileSplit
from transfer_cli.errors import TransferCliError


@DATASETS.register("imagefolder")
def imagefolder(cfg: DictConfig) -> DataBundle:
    """One sub-folder per class under data.root (or root/train, root/val, root/test when present)."""
    root = existing_dir(cfg.root, "root")
    train_dir = root / "train" if (root / "train").is_dir() else root
    class_names = _class_folders(train_dir)
    train = scan_split(train_dir, class_names)
    val = scan_split(root / "val", class_names) if train_dir != root and (root / "val").is_dir() else None
    test_dir: Optional[Path] = None
    if cfg.test_root is not None:
        test_dir = existing_dir(cfg.test_root, "test_root")
    elif train_dir != root and (root / "test").is_dir():
        test_dir = root / "test"
    test = scan_split(test_dir, class_names) if test_dir is not None else None
    return assemble(cfg, class_names, train, val, test)


def _class_folders(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise TransferCliError(
            f"no class folders in {folder}; put the images of each class in its own sub-folder"
        )
    return names


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, searched recursively, sorted: a reproducible order."""
    return sorted(p for p in files_below(folder) if p.suffix.lower() in image_extensions())


def image_extensions() -> tuple[str, ...]:
    from torchvision.datasets.folder import IMG_EXTENSIONS  # the extensions ImageFolder accepts

    return IMG_EXTENSIONS


def scan_split(folder: Path, class_names: Sequence[str]) -> ImageFileSplit:
    """Every image under folder/<class>/ (searched recursively), in a sorted, reproducible order."""
    extra = sorted(set(_class_folders(folder)) - set(class_names))
    if extra:
        raise TransferCliError(
            f"{folder} has class folders {extra} that the training folder lacks; "
            "use the same class folders in train, val and test"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue  # a val/test folder may lack a class
        images = image_files(class_dir)
        if not images:
            raise TransferCliError(
                f"class folder {class_dir} has no images ({' '.join(image_extensions())}); "
                "add images or remove the folder"
            )
        paths += images
        labels += [label] * len(images)
    return ImageFileSplit(tuple(paths), torch.tensor(labels, dtype=torch.long))


def files_below(folder: Path) -> Iterator[Path]:
    """Every file under `folder`, following linked folders (datasets are often assembled from links); a
    link back to a folder it sits in would repeat the tree forever, and is one error naming it."""
    yield from _walk(folder, (os.path.realpath(folder),))


def _walk(folder: Path, ancestors: tuple[str, ...]) -> Iterator[Path]:
    with os.scandir(folder) as entries:
        entries = sorted(entries, key=lambda e: e.name)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir():  # follows a link
            real = os.path.realpath(path)
            if real in ancestors:
                raise TransferCliError(
                    f"{path} links back to {real}, a folder it is in (a symlink loop); remove the link"
                )
            yield from _walk(path, (*ancestors, real))
        elif entry.is_file():
            yield path
