"""StochNorm (Kou, You, Long & Wang, "Stochastic Normalization", NeurIPS 2020): in training, every
BatchNorm channel normalises with the batch's statistics with probability p and with the moving
statistics otherwise, a fresh choice per channel, layer and step; evaluation is plain BatchNorm.

What TLlib does (`tllib/normalization/stochnorm.py`, `examples/.../stochnorm.py`) and this module follows:
per channel s ~ Bernoulli(p); out = (1 − s)·BN_moving(x) + s·BN_batch(x), the moving branch computed
with the statistics before this step's update, and the moving statistics updated every training step
(the batch branch always runs); p = 0.5 (`--prob`); the affine weights and moving statistics are the
pretrained BatchNorm's. TLlib's `convert_model` passes p positionally into `track_running_stats`, so
its layers always run at the default p = 0.5; here p is passed by name, and p = 1 is ordinary
BatchNorm (exactly: the moving branch is skipped), which makes p = 1 plain fine-tuning.

Where this differs: the layers are not replaced, their class is changed in place (a subclass that
overrides `forward` and calls the original one for each branch), so parameter names, checkpoints,
layer groups and hooks stay as they were, and timm's BatchNorm + activation layers keep their
activation (TLlib's conversion would drop it). Layers in eval mode (a frozen group's, `bn: freeze`)
are plain BatchNorm, as at evaluation. The choice of branch draws from torch's random stream.
Not a loss term: it adds no penalty, but as a term it combines with schedules and other terms.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer, config_key

_STOCHASTIC: dict[type, type] = {}  # BatchNorm class -> its stochastic subclass


class StochasticNorm:
    """Mixed into a BatchNorm class: per channel, batch statistics with probability `stochnorm_p`."""

    stochnorm_p = 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normalise = super().forward  # the layer's own BatchNorm (and, for timm's BatchNormAct, activation)
        if not self.training or self.stochnorm_p >= 1 or not self.track_running_stats:
            return normalise(x)
        self.training = False
        try:
            moving = normalise(x)  # the moving statistics as they are before this step's update
        finally:
            self.training = True
        batch = normalise(x)  # batch statistics; updates the moving ones
        shape = [1] * x.dim()
        shape[1] = x.shape[1]
        use_batch = torch.rand(shape, device=x.device) < self.stochnorm_p
        return torch.where(use_batch, batch, moving)


def stochastic_class(cls: type) -> type:
    if cls not in _STOCHASTIC:
        _STOCHASTIC[cls] = type(f"Stoch{cls.__name__}", (StochasticNorm, cls), {})
    return _STOCHASTIC[cls]


def convert_batchnorms(model: nn.Module, p: float) -> int:
    """Make every BatchNorm of `model` stochastic with probability p, in place; the number converted."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if not isinstance(module, StochasticNorm):
                module.__class__ = stochastic_class(type(module))
            module.stochnorm_p = p
            count += 1
    return count


@REGULARIZERS.register("stochnorm")
class StochNorm(Regularizer):
    """Every BatchNorm picks, per channel and step, batch statistics with probability p, else the moving ones."""

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.p = float(cfg.p)
        if not 0 <= self.p <= 1:
            raise TransferCliError(f"{config_key(cfg, 'p')}={cfg.p} must be a probability in [0, 1]")

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        if convert_batchnorms(model.body, self.p) == 0:
            raise TransferCliError(f"{self.name} acts on BatchNorm layers and this backbone has none (LayerNorm "
                                   "models: ViT, BERT); use it with a CNN")

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {}
