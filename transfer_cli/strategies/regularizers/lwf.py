"""LwF as a fine-tuning regulariser (Li & Hoiem, "Learning without Forgetting", ECCV 2016, as TLlib runs
it for task adaptation): keep the source task's outputs while learning the target task.

Before training, the frozen pretrained model (body + its own source classifier, eval mode) gives
each training image its source logits y⁰, once. During training a frozen copy of that source
classifier reads the model's features, and the loss adds
weight·KL(softmax(y⁰/T) ‖ softmax(y_s/T)), averaged over the batch (KL's `batchmean`).

What TLlib does (`examples/task_adaptation/image_classification/lwf.py`,
`tllib/regularization/lwf.py`, `knowledge_distillation.py`) and this module follows: T = 3, weight
4 (`--trade-off`), no T² factor; the source head is a copy of the pretrained classifier that is left
out of the optimizer (it does not train; gradients pass through it to the body); the source logits
are collected once over the training set in stored order. TLlib collects them through its training
transform; here through the training loader as it is (augmented only with `data.augment=true`).

Each batch needs the stored logits of its own examples: the training loader is wrapped to add each
example's position (`example_index`, from the loader's own order of the epoch), and the stored labels
are checked against the batch's, so a misaligned order fails loudly instead of distilling wrong targets.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.regularizers.base import REGULARIZERS, HeadInputTerm
from transfer_cli.strategies.regularizers.source_task import over_training_split, source_head

#: batch key holding each example's position in the training split
INDEX = "example_index"


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) ‖ softmax(student/T)), summed over classes and averaged over the batch."""
    log_student = F.log_softmax(student.float() / temperature, dim=-1)
    return F.kl_div(log_student, F.softmax(teacher.float() / temperature, dim=-1), reduction="batchmean")


class IndexedLoader:
    """The training loader, its batches carrying each example's position (`example_index`)."""

    def __init__(self, loader: Any):
        if not hasattr(loader, "batch_indices"):
            raise TransferCliError("lwf needs a training loader that can name its examples (transfer-cli's own "
                                   "loaders); this one cannot")
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        for index, batch in zip(self.loader.batch_indices(), self.loader):
            yield {**batch, INDEX: index}


@REGULARIZERS.register("lwf")
class LearningWithoutForgetting(HeadInputTerm):
    """weight·KL(source logits stored before training ‖ the frozen source head on the current features), at T."""

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight, self.temperature = float(cfg.weight), float(cfg.temperature)
        if self.temperature <= 0:
            raise TransferCliError(f"{cfg._get_full_key('temperature')}={cfg.temperature} must be positive")
        self.head: torch.nn.Module | None = None
        self.source_logits: torch.Tensor | None = None  # (training examples, source classes)
        self.labels: torch.Tensor | None = None
        self._restored_head: Mapping[str, torch.Tensor] | None = None

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        self.head = source_head(model, self.name).requires_grad_(False)
        if self.source_logits is not None:  # restored (resume, eval): the saved head, not the rebuilt model's
            self.head.load_state_dict(self._restored_head)
            self.source_logits, self.labels = self.source_logits.to(device), self.labels.to(device)
            return
        self.source_logits, self.labels = over_training_split(
            model, train_loader, device, lambda batch: self.head(model.features(batch)))

    def wrap_loader(self, split: str, loader: Any) -> Any:
        return IndexedLoader(loader) if split == "train" else loader

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.head_input()
        if INDEX not in batch:
            raise TransferCliError("lwf: the training batches carry no example_index (the strategy's wrap_loader "
                                   "did not let the terms wrap the loader)")
        index = batch[INDEX].to(self.labels.device)
        if not torch.equal(self.labels[index], batch["labels"]):
            raise TransferCliError("lwf: the training batches' labels differ from the stored ones at their example "
                                   "positions; the loader's order is not the one the source outputs were stored in")
        return {self.name: self.weight * distillation_loss(self.head(features), self.source_logits[index],
                                                           self.temperature)}

    def state_dict(self) -> dict[str, Any]:
        return {"source_logits": self.source_logits, "labels": self.labels, "head": self.head.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = self.labels.device if self.labels is not None else None
        self.source_logits, self.labels = state["source_logits"].to(device), state["labels"].to(device)
        self._restored_head = state["head"]
        if self.head is not None:
            self.head.load_state_dict(self._restored_head)
