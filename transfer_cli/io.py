"""Atomic file writes: a crash never leaves a half-written file in place of a good one."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)  # mkstemp makes 0600; the final file gets the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike) -> Any:
    """Load a checkpoint written by `save_torch`; weights_only so a file cannot run code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, default=str) + "\n"


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    with open(path, "a") as f:
        f.write(_json_line(record))
        f.flush()
        os.fsync(f.fileno())


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(_json_line(r) for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
