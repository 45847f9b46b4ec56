"""EWC (Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017) as a term.

After each stage: the diagonal Fisher information F of every trained parameter, and the weights w* the
stage ended with; later stages add λ/2·Σ_i F_i (w_i − w*_i)² (L2-SP with Fisher weights and an anchor that
moves to each stage's end). As PyCIL's ewc.py (LAMDA's class-incremental toolbox; PILOT has no EWC) does:
F is the mean over the stage's batches of the squared gradient of the batch's cross-entropy on its own
labels (the empirical Fisher, per batch), capped at `fisher_max`; a new stage's Fisher is merged with the
old one as α·F_old + (1 − α)·F_new on the old entries, α = old classes / classes seen; the head's new
rows enter the penalty only once they have an anchor. Departure: the Fisher pass runs the model in eval
mode (PyCIL: train mode), so it does not move BatchNorm's running statistics.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.engine.device import to_device
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.continual.stage_hooks import StageHooks
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer
from transfer_cli.strategies.regularizers.flat import RegularizedFineTune


def diagonal_fisher(model: TransferModel, loader: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """Mean over the loader's batches of (∂ CE(batch) / ∂w)², for every parameter that trains."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    was_training = model.training
    model.eval()
    batches = 0
    for batch in loader:
        batch = to_device(batch, device)
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            F.cross_entropy(model(batch).float(), batch["labels"]).backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
        batches += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return {n: f / max(batches, 1) for n, f in fisher.items()}


def old_part(current: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """The entries of a (grown) parameter that the anchor covers: the head's old rows."""
    return current[tuple(slice(0, size) for size in anchor.shape)]


@REGULARIZERS.register("ewc")
class EWC(StageHooks, Regularizer):
    """λ/2·Σ F_i (w_i − w*_i)² towards the previous stage's weights, F its diagonal Fisher (EWC)."""

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight, self.fisher_max = float(cfg.weight), float(cfg.fisher_max)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.classes = 0  # the classes the Fisher has seen

    def after_stage(self, stage: int, model: TransferModel, loader: Any, device: torch.device) -> None:
        new = {n: f.clamp(max=self.fisher_max) for n, f in diagonal_fisher(model, loader, device).items()}
        seen = model.head.out_features
        if self.fisher:
            alpha = self.classes / seen
            for name, old in self.fisher.items():
                if name in new:
                    old_part(new[name], old).mul_(1 - alpha).add_(alpha * old.to(new[name].device))
        params = dict(model.named_parameters())
        self.fisher = new
        self.anchor = {n: params[n].detach().clone() for n in new}
        self.classes = seen

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        total = logits.new_zeros((), dtype=torch.float32)
        for name, anchor in self.anchor.items():
            p = params.get(name)
            if p is not None and p.requires_grad:
                total = total + (self.fisher[name] * (old_part(p, anchor) - anchor) ** 2).sum()
        return {self.name: self.weight / 2 * total}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor, "classes": self.classes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.fisher, self.anchor, self.classes = dict(state["fisher"]), dict(state["anchor"]), int(state["classes"])


@STRATEGIES.register("ewc")
class EWCFineTune(RegularizedFineTune):
    """Fine-tuning stage by stage with EWC's Fisher-weighted pull to the previous stage's weights (EWC)."""

    term = "ewc"
