"""Where a body's weights came from, for results.json: a hub model, a local file or folder with its
sha256, or random initialisation.

`backbone.pretrained` alone cannot say it: the quickstart loads a local file with pretrained=false,
and a scratch run has pretrained=true in its config. Builders set `TransferModel.weights_origin`
from what they actually loaded, so a reader (and `report --by weights.source`) can tell P-T from RI-T
and two weight files apart.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: files of a model folder whose bytes are the weights (the rest: config, tokenizer)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth", "*.pt")


def random_init() -> dict[str, Any]:
    return {"source": "random"}


def hub(name: str) -> dict[str, Any]:
    """Weights the library fetched by name (from the hub or its local cache of the hub)."""
    return {"source": "hub", "name": name}


def local(path: Path, **extra: Any) -> dict[str, Any]:
    """A local weights file, or a model folder (its weight files hashed together, in name order)."""
    path = Path(path)
    return {"source": "file" if path.is_file() else "folder", "path": str(path), "sha256": sha256(path), **extra}


def sha256(path: Path) -> str:
    if path.is_file():
        return _file_sha256(path)
    files = sorted({f for pattern in WEIGHT_FILES for f in path.glob(pattern) if f.is_file()})
    combined = hashlib.sha256()
    for file in files:
        combined.update(f"{file.name}:{_file_sha256(file)}\n".encode())
    return combined.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
