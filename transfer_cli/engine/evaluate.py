"""Evaluation: the model (through its strategy) on a loader, summed into a `metrics.Tally`."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Optional

import torch

from transfer_cli.engine.device import autocast, to_device
from transfer_cli.engine.metrics import Tally


@torch.no_grad()
def tally(model, strategy, loader: Iterable, device: torch.device, precision: str,
          max_batches: Optional[int] = None, detailed: bool = False) -> Tally:
    """The sums every metric follows from, over the loader's first `max_batches` batches (all: None);
    `detailed` adds what the test split reports beyond the per-epoch metrics (calibration)."""
    was_training = model.training
    model.eval()
    counts = None
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):  # known before the first batch, so an empty shard still has its sums
        counts = Tally(head.out_features, device, detailed)
    for batch in islice(loader, max_batches):
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = strategy.forward(model, batch)
        if counts is None:
            counts = Tally(logits.shape[1], device, detailed)
        counts.add(logits, batch["labels"])
    model.train(was_training)
    return counts if counts is not None else Tally(0, device, detailed)


def evaluate(model, strategy, loader: Iterable, device: torch.device, precision: str,
             max_batches: Optional[int] = None, detailed: bool = False) -> dict:
    """The metrics (`metrics.Tally.metrics`) of one process's evaluation of the loader."""
    return tally(model, strategy, loader, device, precision, max_batches, detailed).metrics()
