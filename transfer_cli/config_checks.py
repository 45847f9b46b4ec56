"""Values a config may not hold, checked once per composed config before Hydra makes a run folder.

The type checks (a number stays a number) are in `overrides`; these are the values of the right type
that cannot work: a rate that does not train, a batch of no examples, a run name that is a path.
"""
from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transfer_cli.errors import TransferCliError


def check_values(cfg: DictConfig) -> None:
    """One TransferCliError naming the first value that cannot work and what to write instead."""
    _check_name(OmegaConf.select(cfg, "name", default=None))
    lr = OmegaConf.select(cfg, "optim.lr", default=None)
    if isinstance(lr, (int, float)) and not (math.isfinite(lr) and lr > 0):
        raise TransferCliError(f"optim.lr={lr} must be a positive number (it scales every update); e.g. optim.lr=0.01")
    for key in ("trainer.batch_size", "trainer.eval_batch_size"):
        _at_least_one(key, OmegaConf.select(cfg, key, default=None))
    for key in ("trainer.early_stopping_patience", "trainer.log_every"):
        _at_least_one(key, OmegaConf.select(cfg, key, default=None), null="null to turn it off"
                      if key.endswith("patience") else None)
    clip = OmegaConf.select(cfg, "trainer.grad_clip", default=None)
    if isinstance(clip, (int, float)) and not clip > 0:
        raise TransferCliError(f"trainer.grad_clip={clip} must be positive (the largest gradient norm), or null")


def _check_name(name: Any) -> None:
    """`name` ends the run folder's name: a path in it would put the run outside runs/<date>/."""
    if name is None:
        return
    text = str(name)
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        raise TransferCliError(
            f"name={text!r} would make the run folder a path outside its parent folder; use a plain name "
            "(letters, digits, - and _), or choose the folder itself with hydra.run.dir=..."
        )


def _at_least_one(key: str, value: Any, null: str | None = None) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value < 1:
        extra = f", or {null}" if null else ""
        raise TransferCliError(f"{key}={value} must be at least 1{extra}")
