"""Text classification sources: CSV / JSONL files, and anything `datasets.load_dataset` reads."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from transfer_cli.data.common import DATASETS, assemble, first_line
from transfer_cli.data.splits import DataBundle, TextSplit
from transfer_cli.errors import TransferCliError

#: split -> (texts, raw labels, where they came from for error messages)
Columns = dict[str, tuple[list, list, str]]


@DATASETS.register("csv_text")
def csv_text(cfg: DictConfig) -> DataBundle:
    """Text classification from CSV or JSONL files with a text column and a label column."""
    columns: Columns = {}
    for split in ("train", "val", "test"):
        file = cfg[f"{split}_file"]
        if file is not None:
            path = Path(os.path.expanduser(str(file)))
            rows = read_rows(path, f"{split}_file")
            columns[split] = _pick(cfg, list(rows[0]), lambda c: [r.get(c) for r in rows], str(path))
    return _bundle(cfg, columns, class_names=None)


@DATASETS.register("hf_dataset")
def hf_dataset(cfg: DictConfig) -> DataBundle:
    """A text classification dataset through datasets.load_dataset(path, name) (hub name or local files)."""
    try:
        import datasets
    except ImportError:
        raise TransferCliError("data=hf_dataset needs the `datasets` package; pip install datasets") from None
    if cfg.train_split is None:
        raise TransferCliError("data.train_split is null; set it to the dataset's training split, e.g. train")
    files = OmegaConf.to_container(cfg.data_files) if OmegaConf.is_config(cfg.data_files) else cfg.data_files
    try:
        loaded = datasets.load_dataset(cfg.path, cfg.config_name, data_files=files)
    except (OSError, ValueError) as e:
        raise TransferCliError(
            f"cannot load dataset {cfg.path!r}: {first_line(e)}; "
            "check data.path, data.config_name and data.data_files"
        ) from None
    columns: Columns = {}
    for split in ("train", "val", "test"):
        name = cfg[f"{split}_split"]
        if name is None:
            continue
        if name not in loaded:
            raise TransferCliError(
                f"dataset {cfg.path!r} has no split {name!r} (it has: {', '.join(loaded)}); "
                f"set data.{split}_split to one of them, or to null to carve it from train"
            )
        table = loaded[name]
        columns[split] = _pick(cfg, table.column_names, lambda c: list(table[c]), f"{cfg.path} [{name}]")
    feature = loaded[cfg.train_split].features.get(cfg.label_column)
    names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    return _bundle(cfg, columns, class_names=names)


def read_rows(path: Path, key: str) -> list[dict[str, Any]]:
    """The rows of a CSV (.tsv: tab-separated) or JSON-lines (.jsonl, .json) file, as dicts."""
    if not path.is_file():
        raise TransferCliError(f"text file {path} does not exist; set data.{key}=<file>")
    content = _utf8_text(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _json_rows(content, path)
    else:
        rows = list(csv.DictReader(io.StringIO(content, newline=""),
                                   delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
    if not rows:
        raise TransferCliError(f"text file {path} has no rows; set data.{key} to a file with examples")
    return rows


def _utf8_text(path: Path) -> str:
    """The file's text; a file in another encoding is one line naming where its first non-UTF-8 byte is."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not part of the header
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TransferCliError(
            f"text file {path} is not UTF-8: byte 0x{data[e.start]:02x} on line {line} cannot be decoded; "
            f"save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix})"
        ) from None


def _json_rows(content: str, path: Path) -> list[dict[str, Any]]:
    """JSON lines; a .json file holding one array of objects is accepted too."""
    if content.lstrip().startswith("["):
        return _objects(_json(content, path, None), path)
    lines = [(number, line) for number, line in enumerate(content.splitlines(), 1) if line.strip()]
    return [_object(_json(line, path, number), path, number) for number, line in lines]


def _json(text: str, path: Path, number: Optional[int]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {number} of {path}" if number else str(path)
        raise TransferCliError(f"{where} is not JSON ({e}); fix the file") from None


def _objects(rows: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise TransferCliError(f"{path} is not a JSON array of objects; write one object per example")
    return [_object(row, path, None, index) for index, row in enumerate(rows, 1)]


def _object(row: Any, path: Path, number: Optional[int], index: Optional[int] = None) -> dict[str, Any]:
    if not isinstance(row, dict):
        where = f"line {number} of {path}" if number else f"element {index} of {path}"
        raise TransferCliError(f"{where} is {type(row).__name__}, not an object with the text and label fields; "
                               "write one JSON object per example")
    return row


def _pick(
    cfg: DictConfig, available: Sequence[str], fetch: Callable[[str], list], where: str
) -> tuple[list, list, str]:
    """(texts, labels, where) of one split, after checking both configured columns exist."""
    for key in ("text_column", "label_column"):
        if cfg[key] not in available:
            raise TransferCliError(
                f"column {cfg[key]!r} not in {where} (columns: {', '.join(available)}); "
                f"set data.{key}=<column>"
            )
    return fetch(cfg.text_column), fetch(cfg.label_column), where


def _bundle(cfg: DictConfig, columns: Columns, class_names: Optional[Sequence[str]]) -> DataBundle:
    """TextSplits with one label mapping for all splits, then val/test carved if missing.

    With `class_names` (a dataset's ClassLabel feature) the raw labels are already class ids;
    without, they are class names (strings or integers) and the names are collected from all splits.
    """
    by_id = class_names is not None
    names = list(class_names) if by_id else _label_names(columns)
    index = {name: i for i, name in enumerate(names)}
    splits = {}
    for split, (texts, labels, where) in columns.items():
        if by_id:
            ids = [label if isinstance(label, int) else -1 for label in labels]
        else:
            ids = [index.get(str(label), -1) for label in labels]
        bad = next((row for row, i in enumerate(ids) if not 0 <= i < len(names)), None)
        if bad is not None:
            raise TransferCliError(
                f"example {bad + 1} of {where} has no usable label ({labels[bad]!r}); label every example"
            )
        strings = tuple("" if t is None else str(t) for t in texts)
        splits[split] = TextSplit(strings, torch.tensor(ids, dtype=torch.long))
    return assemble(cfg, names, splits["train"], splits.get("val"), splits.get("test"))


def _label_names(columns: Columns) -> list[str]:
    """Sorted distinct labels of all splits as strings (numerically when they are all integers)."""
    names = {str(label) for _, labels, _ in columns.values() for label in labels if label not in (None, "")}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)

