"""A stage's test: the predicted class of every test example, through the strategy's forward (no task id),
and the mean cross-entropy over the classes seen."""
from __future__ import annotations

from itertools import islice
from typing import Iterable, Optional

import torch
import torch.nn.functional as F

from transfer_cli.engine.device import autocast, to_device


@torch.no_grad()
def predict(model, strategy, loader: Iterable, device: torch.device, precision: str,
            max_batches: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(predictions, labels) over the loader, or its first `max_batches`, on the CPU; and the mean loss."""
    was_training = model.training
    model.eval()
    predictions, labels = [], []
    loss_sum = 0.0
    for batch in islice(loader, max_batches):
        batch = to_device(batch, device)
        with autocast(device, precision):
            logits = strategy.forward(model, batch)
        predictions.append(logits.argmax(dim=1).cpu())
        loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], reduction="sum"))
        labels.append(batch["labels"].cpu())
    model.train(was_training)
    empty = torch.zeros(0, dtype=torch.long)
    count = sum(len(x) for x in labels)
    return ((torch.cat(predictions) if predictions else empty), (torch.cat(labels) if labels else empty),
            loss_sum / count if count else float("nan"))
