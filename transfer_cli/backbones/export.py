"""Export a trained body as a pretrained source for the next run (`backbone.weights=<path>`).

Image bodies become one .safetensors file with timm's own key names (the trained head under the
architecture's classifier name, the next run's source head) and, in its metadata, the architecture
and the data config, so the next run rebuilds the same model and preprocessing from the file alone. Text bodies become a save_pretrained folder (model + tokenizer).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import safetensors.torch
from torch import nn

from transfer_cli.backbones.hf_backbone import HFModel
from transfer_cli.backbones.model import TransferModel
from transfer_cli.io import atomic_path

#: Written beside the weights of an exported text body: the `metadata` passed to `export_body`.
HF_METADATA_FILE = "transfer_cli.json"


def export_body(model: TransferModel, path: str | os.PathLike, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write `model.body` (not the head) to `path` atomically and return the path.

    `metadata` (e.g. run name, dataset, accuracy) is stored with it; non-string values as JSON.
    """
    path = Path(path)
    if isinstance(model, HFModel):
        _export_folder(model, path, dict(metadata or {}))
    else:
        _export_safetensors(model, path, dict(metadata or {}))
    return path


def _export_safetensors(model: TransferModel, path: Path, metadata: dict[str, Any]) -> None:
    """The body in timm's names, and the trained head under the architecture's classifier name (e.g. `fc`),
    so the next run keeps it as its source head (Co-Tuning and LwF need the source task's classifier)."""
    state = dict(model.body.state_dict())
    classifier = model.body.pretrained_cfg.get("classifier")
    if isinstance(classifier, str) and isinstance(model.head, nn.Linear):
        state.update({f"{classifier}.{k}": v for k, v in model.head.state_dict().items()})
    # clone: safetensors refuses tensors that share storage, and wants them contiguous
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
    header = {
        "architecture": model.body.pretrained_cfg["architecture"],
        "pretrained_cfg": json.dumps(model.preprocessing),
        **{k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in metadata.items()},
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=header)


def _export_folder(model: HFModel, path: Path, metadata: dict[str, Any]) -> None:
    with replace_folder(path) as tmp:
        model.body.save_pretrained(tmp)
        model.preprocessing["tokenizer"].save_pretrained(tmp)
        (tmp / HF_METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def replace_folder(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; swapped in for `path` when the block ends without an
    error, so a failed export leaves the old folder as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
