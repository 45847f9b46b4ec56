"""The run's checkpoints: `last.pt` (everything to resume) and `best.pt` (the selected weights).

Both are written atomically, so a kill never leaves half a file; one that is damaged anyway (cut short
by a copy, overwritten, edited) is one line naming it and what can be done: start over, or keep the
best epoch's weights while best.pt is intact.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import nn

from transfer_cli.io import DamagedFile, load_torch, save_torch
from transfer_cli.run_folder import RunFolder

FORMAT_VERSION = 1
LAST_KEYS = ("model", "optimizer", "scaler", "strategy", "rng", "train_state")


class Checkpoints:
    def __init__(self, run_dir: Path):
        folder = RunFolder(run_dir)
        self.run_dir = folder.path
        self.dir = folder.checkpoints_dir
        self.last = folder.last_checkpoint
        self.best = folder.best_checkpoint

    def save_last(self, state: dict[str, Any]) -> None:
        save_torch(self.last, {"format": FORMAT_VERSION, **state})

    def load_last(self) -> Optional[dict[str, Any]]:
        """last.pt, read when a run starts in its folder; the temporaries of writes a kill cut short go."""
        for cut_short in self.dir.glob(".*.pt.*.tmp"):  # the folder is held (run_lock): no write is under way
            cut_short.unlink(missing_ok=True)
        if not self.last.exists():
            return None
        try:
            return _checked(load_torch(self.last), self.last, LAST_KEYS)
        except DamagedFile as damaged:
            raise damaged.advise(self._after_damaged_last()) from None

    def save_best(self, model: nn.Module, epoch: int) -> None:
        save_torch(self.best, {"format": FORMAT_VERSION, "model": model.state_dict(), "epoch": epoch})

    def load_best_into(self, model: nn.Module) -> int:
        """Load the selected weights into `model`; return the epoch they come from."""
        best = self._read_best()
        model.load_state_dict(best["model"])
        return int(best["epoch"])

    def _read_best(self) -> dict[str, Any]:
        try:
            return _checked(load_torch(self.best), self.best, ("model", "epoch"))
        except DamagedFile as damaged:
            raise damaged.advise(
                f"the best epoch's weights are lost: start the run over (delete {self.dir} and run again with "
                f"trainer.resume=true hydra.run.dir={self.run_dir}), or in a new folder") from None

    def _after_damaged_last(self) -> str:
        start_over = (f"to start over, delete {self.dir} and run again with trainer.resume=true "
                      f"hydra.run.dir={self.run_dir}")
        try:
            epoch = int(self._read_best()["epoch"])
        except (DamagedFile, FileNotFoundError):
            return f"the run cannot continue from it: {start_over}"
        return (f"the run cannot continue from it, but {self.best} (epoch {epoch}) is intact (`transfer-cli eval "
                f"run={self.run_dir}` tests it); {start_over}")


def _checked(saved: Any, path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A loaded checkpoint that holds what it should, else a DamagedFile naming what it lacks."""
    if not isinstance(saved, dict):
        raise DamagedFile(path, f"it holds a {type(saved).__name__}, not a transfer-cli checkpoint")
    lacking = [key for key in keys if key not in saved]
    if lacking:
        raise DamagedFile(path, f"not a transfer-cli checkpoint: it lacks {', '.join(lacking)}")
    return saved
