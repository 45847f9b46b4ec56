"""L2-SP (Li, Grandvalet & Davoine, ICML 2018): pull the body towards its starting point w⁰, not zero.

Ω(w) = α/2·‖w_S − w⁰_S‖² + β/2·‖w_S̄‖², S the pretrained (body) parameters, S̄ the new head. Ω replaces
weight decay, so every optimizer group gets weight_decay=0. As in TLlib's `SPRegularization`, each
term is ½‖·‖² (so the gradient is α(w − w⁰)) and the body term covers every body parameter,
normalisation scales and shifts included; `bn_affine: false` leaves those out (unregularised).
Only parameters that train at a step are in the term (a frozen group adds nothing).
w⁰ is snapshot once in `setup` and saved with the term; a resume or `eval` loads it before `setup`,
which then keeps it: the true starting point, not the moved weights the model is rebuilt with.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from transfer_cli.backbones.model import HEAD, Batch, TransferModel
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer
from transfer_cli.strategies.regularizers.terms import squared_distance

NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def norm_parameter_names(model: nn.Module) -> set[str]:
    """Names of the scale/shift parameters of normalisation layers (BatchNorm, LayerNorm, GroupNorm)."""
    return {f"{m_name}.{p_name}" if m_name else p_name
            for m_name, m in model.named_modules() if isinstance(m, NORMS)
            for p_name, _ in m.named_parameters(recurse=False)}


@REGULARIZERS.register("l2sp")
class L2SP(Regularizer):
    """α/2‖w_S − w⁰_S‖² on the body + β/2‖w_head‖² on the head, in place of weight decay."""

    replaces_weight_decay = True

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)
        self.theta0: dict[str, torch.Tensor] = {}

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        if self.theta0:  # restored from a checkpoint
            self.theta0 = {n: w0.to(device) for n, w0 in self.theta0.items()}
            return
        skip = set() if self.cfg.bn_affine else norm_parameter_names(model)
        params = dict(model.named_parameters())
        self.theta0 = {n: params[n].detach().clone() for g in model.body_group_names()
                       for n in model.group(g).parameter_names if n not in skip}

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters())
        body = [(params[n], w0) for n, w0 in self.theta0.items() if params[n].requires_grad]
        head = [p for p in model.group(HEAD).parameters(model) if p.requires_grad]
        return {self.name: (self.alpha / 2 * squared_distance([p for p, _ in body], [w0 for _, w0 in body])
                            + self.beta / 2 * squared_distance(head))}

    def state_dict(self) -> dict[str, Any]:
        return {"theta0": self.theta0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        device = next(iter(self.theta0.values())).device if self.theta0 else None  # after setup: keep its device
        self.theta0 = {n: w0.to(device) for n, w0 in state["theta0"].items()}
