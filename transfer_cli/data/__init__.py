"""Data layer: sources (registered in DATASETS by config name), subset options, and batch loaders.

    bundle = build_data(cfg.data, seed)             # DataBundle: train / val / test + class_names
    loader = make_loader(bundle.train, model, 32, train=True, seed=seed)
"""
# importing the source modules registers them in DATASETS
from transfer_cli.data import digits, fashion_mnist, hf_dataset, imagefolder, text, torchvision_source  # noqa: F401
from transfer_cli.data.build import build_data
from transfer_cli.data.common import DATASETS
from transfer_cli.data.loaders import BatchLoader, make_loader
from transfer_cli.data.splits import DataBundle, EncodedImageSplit, ImageArraySplit, ImageFileSplit, Split, TextSplit

__all__ = [
    "DATASETS", "BatchLoader", "DataBundle", "EncodedImageSplit", "ImageArraySplit", "ImageFileSplit", "Split",
    "TextSplit",
    "build_data", "make_loader",
]
