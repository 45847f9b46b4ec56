"""Checkpoints inside an epoch (`trainer.checkpoint_every`) and resuming at the next batch.

An epoch's batch order is a function of (seed, epoch), and augmentation draws come from generators of
(seed, epoch) too (data/epoch_order.py), never from the global random state; so the batches after
batch k are the same in any process. A resume skips the first k batches of the epoch and only then
puts back the random state saved after step k: what the loader drew while skipping (a DataLoader's
worker seed) is undone, and dropout draws from there what the uninterrupted run drew. The epoch's
running sums (loss, accuracy, penalties) are saved with the position, so its metrics line is the
uninterrupted run's too.
"""
from __future__ import annotations

import re
import time
from collections import deque
from itertools import islice
from typing import Any, Iterable, Iterator, Optional

import torch

from transfer_cli.engine.seeding import set_rng_state
from transfer_cli.errors import TransferCliError

_EVERY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(min|s|h)?\s*$")
_SECONDS = {"s": 1, "min": 60, "h": 3600}


def parse_every(value: Any) -> tuple[Optional[int], Optional[float]]:
    """trainer.checkpoint_every: steps (`500`) or wall time (`10min`, `90s`, `1h`); null or 0: at epoch ends only."""
    if value in (None, 0, "0", False, "off"):
        return None, None
    match = _EVERY.match(str(value))
    if not match or float(match.group(1)) <= 0 or (match.group(2) is None and "." in match.group(1)):
        raise TransferCliError(f"trainer.checkpoint_every={value!r}; give optimizer steps (500), a wall time "
                               "(10min, 90s, 1h), or null for epoch ends only")
    number, unit = match.groups()
    return (int(number), None) if unit is None else (None, float(number) * _SECONDS[unit])


class EpochTally:
    """The running sums of a training epoch, saved in a mid-epoch checkpoint."""

    def __init__(self, device: torch.device, state: Optional[dict] = None):
        state = state or {}
        self.losses: list[torch.Tensor] = list(state.get("losses", torch.zeros(0)).to(device).unbind())
        self.penalty_sums: dict[str, torch.Tensor] = {k: v.to(device) for k, v in state.get("penalties", {}).items()}
        self.correct = state.get("correct", torch.zeros((), dtype=torch.long)).to(device)
        self.samples: int = state.get("samples", 0)
        self.checked: int = state.get("checked", 0)  # losses already checked for NaN
        self.batches: int = state.get("batches", 0)  # batches of the epoch done

    def add(self, total: torch.Tensor, penalties: dict[str, torch.Tensor], logits: torch.Tensor,
            labels: torch.Tensor) -> None:
        self.losses.append(total.detach())
        for name, value in penalties.items():
            self.penalty_sums[name] = self.penalty_sums.get(name, 0) + value.detach().float()
        self.correct += (logits.detach().argmax(1) == labels).sum()
        self.samples += labels.numel()
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        return {"losses": torch.stack(self.losses).cpu() if self.losses else torch.zeros(0),
                "penalties": {k: v.cpu() for k, v in self.penalty_sums.items()}, "correct": self.correct.cpu(),
                "samples": self.samples, "checked": self.checked, "batches": self.batches}


class MidEpoch:
    """When to write last.pt inside an epoch, and the epoch a resume continues in the middle of."""

    def __init__(self, every: Any):
        self.steps, self.seconds = parse_every(every)
        self._since = time.monotonic()
        self._resume: Optional[dict] = None  # {"epoch", "tally", "rng"} of a mid-epoch checkpoint

    def resume_from(self, saved: dict) -> None:
        mid = saved.get("mid_epoch")
        self._resume = {**mid, "rng": saved["rng"]} if mid else None

    def due(self, step: int) -> bool:
        if self.steps and step % self.steps == 0:
            return True
        return bool(self.seconds) and time.monotonic() - self._since >= self.seconds

    def state(self, epoch: int, tally: EpochTally) -> dict[str, Any]:
        """The checkpoint's `mid_epoch` entry (restarts the wall-time clock); the random state is the checkpoint's."""
        self._since = time.monotonic()
        return {"epoch": epoch, "tally": tally.state_dict()}

    def tally(self, epoch: int, device: torch.device) -> EpochTally:
        resume = self._resume if self._resume and self._resume["epoch"] == epoch else None
        return EpochTally(device, resume["tally"] if resume else None)

    def batches(self, loader: Iterable, steps: int, tally: EpochTally) -> Iterator[tuple[int, Any]]:
        """(position, batch) for the epoch's batches from the first one `tally` has not seen."""
        batches = iter(islice(loader, steps))
        if tally.batches:
            deque(islice(batches, tally.batches), maxlen=0)  # the batches done before the checkpoint
            set_rng_state(self._resume["rng"])
        self._resume = None
        yield from enumerate(batches, tally.batches)
