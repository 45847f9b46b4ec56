"""What SpotTune and AdaFilter share as strategies: build `model.routing` in `setup`, give its decision
network an optimizer group of its own, and report the routing per epoch (see `sites` for the mixing)."""
from __future__ import annotations

from typing import Any, Optional

import torch

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import Strategy
from transfer_cli.strategies.routing.sites import Decider, Routing, Site, plan_sites


def freeze_outside_blocks(model: TransferModel) -> None:
    """Freeze the body's parameters that no block holds (stem, embeddings, final norm), with their BatchNorm."""
    in_blocks = {f"{name}.{p}" for name, block in model.blocks() for p, _ in block.named_parameters()}
    for group in model.body_group_names():
        names = model.group(group).parameter_names
        if not any(n in in_blocks for n in names):
            model.set_trainable(group, False)
    params = dict(model.named_parameters())
    for group in model.body_group_names():
        for name in model.group(group).parameter_names:
            if name not in in_blocks:
                params[name].requires_grad_(False)


class RoutedStrategy(Strategy):
    """What SpotTune and AdaFilter share: build `model.routing` in `setup`, give the decision network its
    own optimizer group ("policy"), let it decide before each forward pass, report the routing per epoch.

    Config: `shared` (train/freeze the body outside the blocks), `policy_lr_mult`, `policy_weight_decay`.
    """

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        self.routing: Optional[Routing] = None
        if str(cfg.shared) not in ("train", "freeze"):
            raise TransferCliError(f"strategy.shared={cfg.shared} must be train or freeze")

    refuses_regularizers = ("its frozen path already keeps the pretrained network; the terms are defined for one "
                            "network, not two mixed per example (use them with finetune, a schedule or a PEFT method)")
    #: route every convolution (with its BatchNorm) of a CNN block instead of the whole block
    per_filter = False
    export_caveat = ("the exported body is the fine-tuned path alone: the per-example routing between it and the "
                     "pretrained weights is not a backbone, so the file does not reproduce this run's accuracy")

    def decider(self, model: TransferModel, sites: list[Site]) -> Decider:
        """The decision network for a model routed at these sites."""
        raise NotImplementedError

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        if isinstance(getattr(model, "routing", None), Routing):  # set up before: keep its copies and hooks
            self.routing = model.routing
            return
        sites = plan_sites(model, self.per_filter)
        self.routing = Routing(model, sites, self.decider(model, sites))
        model.add_module("routing", self.routing.to(device))
        if self.cfg.shared == "freeze":
            freeze_outside_blocks(model)

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        policy = [p for p in self.routing.decider.parameters() if p.requires_grad]
        return [*super().param_groups(model, lr), {"name": "policy", "params": policy,
                                                   "lr": lr * float(self.cfg.policy_lr_mult),
                                                   "weight_decay": float(self.cfg.policy_weight_decay)}]

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        if self.routing.force is None:
            self.routing.decider.begin(batch)
        return model(batch)

    def epoch_stats(self) -> dict[str, float]:
        return self.routing.fractions()
