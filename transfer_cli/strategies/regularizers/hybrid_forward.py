"""Hybrid Forward ("Robust Knowledge Transfer via Hybrid Forward on the Teacher-Student Model", AAAI 2021):
the pretrained model is the teacher, the model being trained the student, and besides the plain student
path every example takes two hybrid paths that alternate their blocks.

Path A runs student block 1, teacher block 2, student block 3, ...; path B the complementary
alternation (teacher block 1, student block 2, ...). Everything outside the blocks (stem, final norm,
pooling) and the head are the student's, so all three paths end in the target head with the target
task's cross-entropy, and their losses can be compared directly: a hybrid path whose loss is far above
the student's says the student's blocks no longer fit the teacher's, i.e. how far the transfer has
drifted. The hybrid paths train the student's blocks to stay interchangeable with the teacher's.

No official code was found, and the paper's weighting rule could not be read here (only its abstract:
"a hybrid forward scheme ... alternately updating layer weights of the student model", whose merit is
"the dynamical balance between the knowledge transfer loss and task specific loss"). This project's
rule, following the seed's description that the two hybrid weights are computed dynamically so that
transfer and task count equally: each hybrid loss L_k is scaled by sg(L_s / L_k), sg = no gradient, so
that its weighted value equals the student path's loss L_s, and the loss is

    L = L_s + weight · ½ Σ_k sg(L_s / L_k) · L_k

(weight = 1: the transfer part counts as much as the task; weight = 0: plain fine-tuning). A hybrid
path that fits badly (large L_k) is damped, one that fits well is emphasised, whatever their scales.
The teacher's blocks are a frozen copy of the pretrained ones in eval mode (no gradient to their
weights; gradients flow through them to the student's blocks below). In the hybrid paths the student's
BatchNorm layers use batch statistics but do not update their running statistics, which stay the
plain student path's. Logged per epoch: `hybrid_forward/ce_student`, `ce_path_a`, `ce_path_b`.
"""
from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.regularizers.base import REGULARIZERS, EpochMeans, Regularizer

PATHS = ("a", "b")


def teacher_indices(blocks: int, path: str) -> list[int]:
    """The (0-based) blocks the teacher runs in path a (blocks 2, 4, ... counted from 1) or path b (1, 3, ...)."""
    first = 1 if path == "a" else 0
    return list(range(first, blocks, 2))


@contextmanager
def borrowed_blocks(student: list[nn.Module], teacher: list[nn.Module], indices: list[int]) -> Iterator[None]:
    """Inside the block, the student's blocks at `indices` run the teacher's instead."""
    try:
        for i in indices:
            student[i].forward = teacher[i].__call__
        yield
    finally:
        for i in indices:
            student[i].__dict__.pop("forward", None)


@contextmanager
def running_statistics_kept(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode use batch statistics without updating their running ones."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
              and m.training and m.track_running_stats]
    try:
        for m in layers:
            m.track_running_stats = False
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


@REGULARIZERS.register("hybrid_forward")
class HybridForward(Regularizer):
    """The target loss of two paths alternating student and teacher blocks, balanced against the student's."""

    needs_inputs = True  # the hybrid paths run the model on each batch's raw inputs

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight = float(cfg.weight)
        self.teacher: nn.ModuleList | None = None
        self._restored: Mapping[str, Any] | None = None
        self._means = EpochMeans(name)

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        blocks = model.blocks()
        if len(blocks) < 2:
            raise TransferCliError(f"{self.name} alternates the student's and the teacher's blocks, and this model has "
                                   f"{len(blocks)} block(s); use a backbone with at least 2")
        self.teacher = nn.ModuleList([copy.deepcopy(b) for _, b in blocks]).eval().requires_grad_(False)
        if self._restored is not None:
            self.teacher.load_state_dict(self._restored)
            self._restored = None

    def hybrid_logits(self, model: TransferModel, batch: Batch, path: str) -> torch.Tensor:
        student = [b for _, b in model.blocks()]
        with ExitStack() as stack:
            stack.enter_context(borrowed_blocks(student, list(self.teacher), teacher_indices(len(student), path)))
            stack.enter_context(running_statistics_kept(model))
            return model(batch)

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.weight == 0:
            return {}
        labels = batch["labels"]
        student = F.cross_entropy(logits.float(), labels)
        hybrid = {p: F.cross_entropy(self.hybrid_logits(model, batch, p).float(), labels) for p in PATHS}
        balanced = sum((student / h).detach() * h for h in hybrid.values()) / len(hybrid)
        self._means.add({"ce_student": student, **{f"ce_path_{p}": h for p, h in hybrid.items()}})
        return {self.name: self.weight * balanced}

    def epoch_stats(self) -> dict[str, float]:
        return self._means.pop()

    def state_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.teacher is None:  # before setup: setup builds the teacher, then loads this
            self._restored = state["teacher"]
            return
        self.teacher.load_state_dict(state["teacher"])
