"""Co-Tuning (You, Kou, Jiang & Wang, "Co-Tuning for Transfer Learning", NeurIPS 2020): keep training the
source model's own classifier, on targets translated from the target labels.

Before training, the frozen pretrained model (body + its source classifier, eval mode) gives each
training image a distribution over the source classes; p(y_s | y_t = c) is their mean over the images
of target class c (each row sums to 1). During training the source head reads the same features as
the new head, and the loss adds λ·CE(source head output, p(y_s | y_t)): a soft cross-entropy,
−Σ_s p(y_s|y_t)·log softmax(z_s), averaged over the batch.

What TLlib does (`tllib/regularization/co_tuning.py`, `examples/.../co_tuning.py`) and this module follows:
- the "direct" relationship (mean of softmax per target class) computed once, on the training set in
  eval mode with the validation transform; λ = 2.3 (`--trade-off`);
- the source head is a copy of the pretrained classifier and trains with the body's rate (0.1× the
  head's with `--finetune`) and weight decay; here its group gets `optim.lr` (the top body group's rate).
Where this differs: the relationship pass reads the training loader as it is, so with
`data.augment=true` it sees one augmented view per image (TLlib uses un-augmented images); the paper's
calibration of the source probabilities and its "reverse" relationship are not in TLlib's code, nor here.
A target class with no training image gets a uniform row.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.strategies.regularizers.base import REGULARIZERS, HeadInputTerm, attach
from transfer_cli.strategies.regularizers.source_task import over_training_split, source_head


def category_relationship(source_probabilities: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """p(y_s | y_t): row c is the mean of the source distributions of the examples labelled c."""
    rows = torch.zeros(num_classes, source_probabilities.shape[1], device=source_probabilities.device)
    rows.index_add_(0, labels, source_probabilities)
    counts = torch.bincount(labels, minlength=num_classes).unsqueeze(1).to(rows.dtype)
    uniform = torch.full_like(rows, 1 / rows.shape[1])
    return torch.where(counts > 0, rows / counts.clamp_min(1), uniform)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−Σ_j t_j·log softmax(logits)_j, averaged over the batch (TLlib's CoTuningLoss)."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


@REGULARIZERS.register("co_tuning")
class CoTuning(HeadInputTerm):
    """λ·CE(source head(features), p(y_s | y_t)): the source classifier keeps training on translated labels."""

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight = float(cfg.weight)
        self.relationship: torch.Tensor | None = None  # (target classes, source classes)
        self.head: torch.nn.Module | None = None

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        self.head = attach(model, self, source_head(model, self.name))
        if self.relationship is not None:  # restored (resume, eval)
            self.relationship = self.relationship.to(device)
            return

        def source_probabilities(batch: Batch) -> torch.Tensor:
            return F.softmax(self.head(model.features(batch)).float(), dim=1)

        probabilities, labels = over_training_split(model, train_loader, device, source_probabilities)
        self.relationship = category_relationship(probabilities, labels, model.head.out_features)

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        return [{"name": f"{self.name}_source_head", "params": list(self.head.parameters()), "lr": lr}]

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.head_input()
        targets = self.relationship[batch["labels"]]
        return {self.name: self.weight * soft_cross_entropy(self.head(features), targets)}

    def state_dict(self) -> dict[str, Any]:
        return {"relationship": self.relationship}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.relationship.device if self.relationship is not None else None  # after setup: keep its device
        self.relationship = state["relationship"].to(device)
