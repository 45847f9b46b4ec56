"""`data=hf_dataset`: a classification dataset through `datasets.load_dataset` (a hub name, or local
files with a builder: csv / json / parquet, `imagefolder`), text or images.

A train split with the column `data.image_column` (default `image`) is an image dataset: its images
stay encoded in the dataset's table and are decoded batch by batch with the backbone's transforms,
as image files are; otherwise it is a text dataset (`data.text_column`). Labels are the
`data.label_column`: a ClassLabel feature gives the class names, plain values are collected as names.
"""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from transfer_cli.data.common import DATASETS, assemble, first_line
from transfer_cli.data.splits import DataBundle, EncodedImageSplit
from transfer_cli.data.text import Columns, check_columns, label_ids, text_bundle
from transfer_cli.errors import TransferCliError

SPLITS = ("train", "val", "test")


@DATASETS.register("hf_dataset")
def hf_dataset(cfg: DictConfig) -> DataBundle:
    """A text or image classification dataset through datasets.load_dataset (hub name or local files)."""
    try:
        import datasets
    except ImportError:
        raise TransferCliError("data=hf_dataset needs the `datasets` package; pip install datasets") from None
    if cfg.train_split is None:
        raise TransferCliError("data.train_split is null; set it to the dataset's training split, e.g. train")
    loaded = _load(cfg, datasets)
    tables = {split: _table(cfg, loaded, split) for split in SPLITS if cfg[f"{split}_split"] is not None}
    feature = tables["train"].features.get(cfg.label_column)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    images = cfg.image_column is not None and cfg.image_column in tables["train"].column_names
    value_key = "image_column" if images else "text_column"
    columns: Columns = {}
    for split, table in tables.items():
        where = f"{cfg.path} [{cfg[f'{split}_split']}]"
        check_columns(cfg, table.column_names, where, (value_key, "label_column"))
        values = _encoded(table, cfg.image_column, datasets) if images else list(table[cfg.text_column])
        columns[split] = (values, list(table[cfg.label_column]), where)
    if not images:
        return text_bundle(cfg, columns, class_names=names)
    names, ids = label_ids(columns, names)
    splits = {split: EncodedImageSplit(table, tuple(range(len(table))), ids[split], where)
              for split, (table, _, where) in columns.items()}
    return assemble(cfg, names, splits["train"], splits.get("val"), splits.get("test"))


def _load(cfg: DictConfig, datasets: Any) -> Any:
    files = OmegaConf.to_container(cfg.data_files) if OmegaConf.is_config(cfg.data_files) else cfg.data_files
    try:
        return datasets.load_dataset(cfg.path, cfg.config_name, data_files=files, data_dir=cfg.data_dir)
    except (OSError, ValueError) as e:
        raise TransferCliError(
            f"cannot load dataset {cfg.path!r}: {first_line(e)}; "
            "check data.path, data.config_name, data.data_files and data.data_dir"
        ) from None


def _table(cfg: DictConfig, loaded: Any, split: str) -> Any:
    name = cfg[f"{split}_split"]
    if name not in loaded:
        raise TransferCliError(
            f"dataset {cfg.path!r} has no split {name!r} (it has: {', '.join(loaded)}); "
            f"set data.{split}_split to one of them, or to null to carve it from train"
        )
    return loaded[name]


def _encoded(table: Any, column: str, datasets: Any) -> Any:
    """The image column alone, as {bytes, path} records: decoded one image at a time, when batched."""
    return table.select_columns([column]).cast_column(column, datasets.Image(decode=False))
