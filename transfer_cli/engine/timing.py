"""Where a run's time goes, and which epochs are validated.

A run's printed time used to be its training steps alone, while validating every epoch and testing
took most of the wall time. The run records each phase (building the data, the model, training,
validation, test) beside the wall time, and `trainer.val_every` validates less often.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

from transfer_cli.errors import TransferCliError


class Stopwatch:
    """Seconds per named phase, and the wall time since it was made."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def wall(self) -> float:
        return time.perf_counter() - self.started


def val_every(value: Any) -> int:
    """Read `trainer.val_every`: validate every k-th epoch (1: every epoch)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise TransferCliError(f"trainer.val_every={value!r}; use a whole number >= 1 (1: validate every epoch)")
    return value


def validates(epoch: int, every: int, max_epochs: int) -> bool:
    """Whether epoch `epoch` (0-based) is validated: every `every`-th epoch, and always the last one.

    Only validated epochs can become the best epoch; an epoch that ends training early (a strategy's
    last stage) is validated too, by the loop.
    """
    return (epoch + 1) % every == 0 or epoch + 1 >= max_epochs


def time_section(seconds: dict[str, float], wall: float) -> dict[str, float]:
    """results.json's `time`: the wall time and each phase, plus what no phase covers (start-up, writing files)."""
    phases = {f"{name}_s": value for name, value in seconds.items()}
    return {"wall_s": wall, **phases, "other_s": max(wall - sum(seconds.values()), 0.0)}
