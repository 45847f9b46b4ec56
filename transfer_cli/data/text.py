"""Text classification from CSV / JSONL files, and the label mapping every labelled table shares
(`data.hf_dataset` uses it for text and images)."""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from omegaconf import DictConfig

from transfer_cli.data.common import DATASETS, assemble
from transfer_cli.data.splits import DataBundle, TextSplit
from transfer_cli.errors import TransferCliError

#: split -> (texts or images, raw labels, where they came from for error messages)
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
            check_columns(cfg, list(rows[0]), str(path), ("text_column", "label_column"))
            columns[split] = ([r.get(cfg.text_column) for r in rows], [r.get(cfg.label_column) for r in rows], str(path))
    return text_bundle(cfg, columns, class_names=None)


def read_rows(path: Path, key: str, skipped: Optional[list[tuple[int, str]]] = None) -> list[dict[str, Any]]:
    """The rows of a CSV (.tsv: tab-separated) or JSON-lines (.jsonl, .json) file, as dicts.

    A JSON line that is not an object is an error, or, given a `skipped` list, recorded there as
    (line number, reason) and left out (`transfer-cli predict` predicts the rest)."""
    if not path.is_file():
        raise TransferCliError(f"text file {path} does not exist; set data.{key}=<file>")
    content = _utf8_text(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = _json_rows(content, path, skipped)
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


def _json_rows(content: str, path: Path, skipped: Optional[list[tuple[int, str]]] = None) -> list[dict[str, Any]]:
    """JSON lines; a .json file holding one array of objects is accepted too."""
    if content.lstrip().startswith("["):
        return _objects(_json(content, path, None), path)
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(_object(_json(line, path, number), path, number))
        except TransferCliError as err:
            if skipped is None:
                raise
            skipped.append((number, str(err).split(" is ", 1)[-1].split(";")[0]))
    return rows


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


def check_columns(cfg: DictConfig, available: Sequence[str], where: str, keys: Sequence[str]) -> None:
    """Each column the config keys name (data.text_column, data.label_column, ...) exists in the split."""
    for key in keys:
        if cfg[key] not in available:
            raise TransferCliError(
                f"column {cfg[key]!r} not in {where} (columns: {', '.join(available)}); "
                f"set data.{key}=<column>"
            )


def label_ids(columns: Columns, class_names: Optional[Sequence[str]]) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The class names and each split's label ids, one mapping for all splits.

    With `class_names` (a dataset's ClassLabel feature) the raw labels are already class ids;
    without, they are class names (strings or integers) and the names are collected from all splits.
    """
    by_id = class_names is not None
    names = list(class_names) if by_id else _label_names(columns)
    index = {name: i for i, name in enumerate(names)}
    ids = {}
    for split, (_, labels, where) in columns.items():
        if by_id:
            found = [label if isinstance(label, int) else -1 for label in labels]
        else:
            found = [index.get(str(label), -1) for label in labels]
        bad = next((row for row, i in enumerate(found) if not 0 <= i < len(names)), None)
        if bad is not None:
            raise TransferCliError(
                f"example {bad + 1} of {where} has no usable label ({labels[bad]!r}); label every example"
            )
        ids[split] = torch.tensor(found, dtype=torch.long)
    return names, ids


def text_bundle(cfg: DictConfig, columns: Columns, class_names: Optional[Sequence[str]]) -> DataBundle:
    """TextSplits of the columns, then val/test carved if missing."""
    names, ids = label_ids(columns, class_names)
    splits = {split: TextSplit(tuple("" if t is None else str(t) for t in texts), ids[split])
              for split, (texts, _, _) in columns.items()}
    return assemble(cfg, names, splits["train"], splits.get("val"), splits.get("test"))


def _label_names(columns: Columns) -> list[str]:
    """Sorted distinct labels of all splits as strings (numerically when they are all integers)."""
    names = {str(label) for _, labels, _ in columns.values() for label in labels if label not in (None, "")}
    if all(n.lstrip("-").isdigit() for n in names):
        return sorted(names, key=int)
    return sorted(names)
