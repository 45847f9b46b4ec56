"""The continual LwF (Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017), as class-incremental
toolboxes run it (PyCIL's lwf.py; PILOT has none): while a stage trains, the logits of the classes seen
before it are kept close to those of the model as the previous stage left it, on the new stage's images:
weight · KD(z_old-classes / T, z_previous / T), KD(p, q) = −Σ softmax(q)·log softmax(p) averaged over the
batch (PyCIL's _KD_loss, no T² factor), T = 2, weight 3 (PyCIL's lamda). Named cil_lwf because `lwf` is the
distillation from the *source* model's head for single-task fine-tuning (strategies/regularizers/).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.continual.stage_hooks import StageHooks
from transfer_cli.strategies.peft.shared import plain_copy
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer
from transfer_cli.strategies.regularizers.flat import RegularizedFineTune


def distillation(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """−Σ_c softmax(targets/T)_c · log softmax(logits/T)_c, averaged over the batch."""
    soft = torch.softmax(targets.float() / temperature, dim=1)
    return -(soft * torch.log_softmax(logits.float() / temperature, dim=1)).sum() / logits.shape[0]


@REGULARIZERS.register("cil_lwf")
class ContinualLwF(StageHooks, Regularizer):
    """weight · KD(old classes' logits, the previous stage's model's logits; T) on the new stage's data (LwF)."""

    needs_inputs = True  # runs the previous model on the raw batch

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight, self.temperature = float(cfg.weight), float(cfg.temperature)
        self.previous: Optional[TransferModel] = None

    def before_stage(self, stage: int, model: TransferModel) -> None:
        """The model as the previous stage left it (rebuilt the same way when a run resumes)."""
        self.previous = plain_copy(model).eval().requires_grad_(False) if stage else None

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.previous is None:
            return {self.name: logits.new_zeros((), dtype=torch.float32)}
        with torch.no_grad():
            targets = self.previous(batch)
        return {self.name: self.weight * distillation(logits[:, :targets.shape[1]], targets, self.temperature)}


@STRATEGIES.register("cil_lwf")
class ContinualLwFFineTune(RegularizedFineTune):
    """Fine-tuning stage by stage, distilling the previous stage's old-class logits, T = 2 (continual LwF)."""

    term = "cil_lwf"
