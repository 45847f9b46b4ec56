"""The run's checkpoints: `last.pt` (everything to resume) and `best.pt` (the selected weights)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from transfer_cli.io import load_torch, save_torch
from transfer_cli.run_folder import RunFolder

FORMAT_VERSION = 1


class Checkpoints:
    def __init__(self, run_dir: Path):
        folder = RunFolder(run_dir)
        self.dir = folder.checkpoints_dir
        self.last = folder.last_checkpoint
        self.best = folder.best_checkpoint

    def save_last(self, state: dict[str, Any]) -> None:
        save_torch(self.last, {"format": FORMAT_VERSION, **state})

    def load_last(self) -> Optional[dict[str, Any]]:
        return load_torch(self.last) if self.last.exists() else None

    def save_best(self, model: nn.Module, epoch: int) -> None:
        save_torch(self.best, {"format": FORMAT_VERSION, "model": model.state_dict(), "epoch": epoch})

    def load_best_into(self, model: nn.Module) -> int:
        """Load the selected weights into `model`; return the epoch they come from."""
        best = load_torch(self.best)
        model.load_state_dict(best["model"])
        return int(best["epoch"])
