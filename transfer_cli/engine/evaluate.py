"""Evaluation: mean loss and top-1 accuracy of the model (through its strategy) on a loader."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from transfer_cli.engine.device import autocast, to_device


@torch.no_grad()
def evaluate(model, strategy, loader: Iterable, device: torch.device, precision: str,
             max_batches: Optional[int] = None) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    count = 0
    for batch in islice(loader, max_batches):
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = strategy.forward(model, batch)
        labels = batch["labels"]
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
        correct += (logits.argmax(dim=1) == labels).sum()
        count += labels.numel()
    model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "acc1": float("nan"), "n": 0}
    return {"loss": loss_sum.item() / count, "acc1": correct.item() / count, "n": count}
