"""Chain-thaw (Felbo et al., "DeepMoji", EMNLP 2017).

Stages: the head alone; then each body group alone, lowest first, with every other group frozen,
the head included (the paper "fine-tunes a single layer at a time"; its code freezes all layers but
the current one); then all groups together. A stage ends after `epochs_per_stage` epochs or when
validation loss has not improved for `patience` epochs, and the next stage starts from the stage's
best weights. Stages after the first train at `next_lr_mult` times the rate (the code's
initial_lr=1e-3, next_lr=1e-4).

The best weights are restored at the start of the next epoch, not at the end of the stage's last one:
the loop saves that epoch's checkpoint (and best.pt, chosen by validation accuracy) from the weights it
just validated, so they stay consistent; the pending weights ride in `state_dict` until then.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from transfer_cli.backbones.model import HEAD, TransferModel
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.schedules.schedule import LayerSchedule, positive_int


@STRATEGIES.register("chain_thaw")
class ChainThaw(LayerSchedule):
    """Head, then each body group alone (lowest first), then everything, each stage early-stopped."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        self.epochs_per_stage = None if cfg.epochs_per_stage is None else positive_int(cfg, "epochs_per_stage")
        self.patience = positive_int(cfg, "patience")
        self.next_lr_mult = float(cfg.next_lr_mult)
        self.stage = 0
        self.epochs_in_stage = 0
        self.since_best = 0
        self.best_loss = math.inf
        self.best_weights: Optional[dict[str, torch.Tensor]] = None
        self.restore: Optional[dict[str, torch.Tensor]] = None  # the last stage's best, loaded next epoch

    @staticmethod
    def stages(model: TransferModel) -> list[list[str]]:
        return [[HEAD], *([name] for name in model.body_group_names()), model.group_names()]

    def trainable_at(self, epoch: int, model: TransferModel) -> list[str]:
        return self.stages(model)[min(self.stage, len(self.stages(model)) - 1)]

    def on_epoch_start(self, epoch: int, model: TransferModel) -> bool:
        if self.restore is not None:
            model.load_state_dict(self.restore)
            self.restore = None
        return super().on_epoch_start(epoch, model)

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        return super().param_groups(model, lr if self.stage == 0 else lr * self.next_lr_mult)

    def on_epoch_end(self, epoch: int, model: TransferModel, val: Mapping[str, float]) -> bool:
        self.epochs_in_stage += 1
        if val["loss"] < self.best_loss:
            self.best_loss, self.since_best = val["loss"], 0
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.since_best += 1
        if self.since_best < self.patience and self.epochs_in_stage != self.epochs_per_stage:
            return False
        self.restore = self.best_weights
        self.stage += 1
        self.epochs_in_stage, self.since_best, self.best_loss, self.best_weights = 0, 0, math.inf, None
        return self.stage == len(self.stages(model))

    STATE = ("stage", "epochs_in_stage", "since_best", "best_loss", "best_weights", "restore")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **{key: getattr(self, key) for key in self.STATE}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for key in self.STATE:
            setattr(self, key, state[key])
