"""Chain-thaw (Felbo et al., "DeepMoji", EMNLP 2017).

Stages: the head alone; then each body group alone, lowest first, with every other group frozen,
the head included (the paper "fine-tunes a single layer at a time"; its code freezes all layers but
the current one); then all groups together. A stage ends after its share of epochs or when validation
loss has not improved for `patience` validations, and the next stage starts from the stage's best
weights. Stages after the first train at `next_lr_mult` times the rate (the code's initial_lr=1e-3,
next_lr=1e-4).

A stage's share (`epochs_per_stage`): `auto` splits trainer.max_epochs evenly over the stages (the
last, all groups together, takes the remainder), so the schedule always completes within the run;
a number caps every stage at that many epochs; null leaves stages uncapped, as DeepMoji's code
(nb_epochs=1000), ended by early stopping alone.

The best weights are restored at the start of the next epoch, not at the end of the stage's last one:
the loop saves that epoch's checkpoint (and best.pt, chosen by validation accuracy) from the weights it
just validated, so they stay consistent; the pending weights ride in `state_dict` until then.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from transfer_cli.backbones.model import HEAD, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.schedules.schedule import LayerSchedule, positive_int


@STRATEGIES.register("chain_thaw")
class ChainThaw(LayerSchedule):
    """Head, then each body group alone (lowest first), then everything, each stage early-stopped."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        self.epochs_per_stage = cfg.epochs_per_stage
        if self.epochs_per_stage not in ("auto", None) and (
                isinstance(self.epochs_per_stage, bool) or not isinstance(self.epochs_per_stage, int)
                or self.epochs_per_stage < 1):
            raise TransferCliError(f"strategy.epochs_per_stage={self.epochs_per_stage!r}; use auto (trainer.max_epochs "
                                   "split over the stages), a whole number >= 1, or null (early stopping alone)")
        self.patience = positive_int(cfg, "patience")
        self.next_lr_mult = float(cfg.next_lr_mult)
        self.caps: list[Optional[int]] = []  # each stage's most epochs, set by `plan`
        self.stage = 0
        self.epochs_in_stage = 0
        self.since_best = 0
        self.best_loss = math.inf
        self.best_weights: Optional[dict[str, torch.Tensor]] = None
        self.restore: Optional[dict[str, torch.Tensor]] = None  # the last stage's best, loaded next epoch

    def stages(self, model: TransferModel) -> list[list[str]]:
        return [[HEAD], *([name] for name in model.body_group_names()), model.group_names()]

    def stage_at(self, epoch: int, count: int) -> int:
        return min(self.stage, count - 1)

    def plan(self, model: TransferModel, max_epochs: int) -> Optional[str]:
        count = len(self.stages(model))
        if self.epochs_per_stage == "auto":
            share = max(max_epochs // count, 1)
            self.caps = [share] * (count - 1) + [max(max_epochs - share * (count - 1), 1)]
        else:
            self.caps = [self.epochs_per_stage] * count
        return super().plan(model, max_epochs)

    def epochs_needed(self, model: TransferModel) -> int:
        """The most epochs the stages can take (auto: the budget itself); uncapped, the fewest: each stage
        ends `patience` validations after its first at the earliest."""
        if self.epochs_per_stage is None:
            return len(self.caps) * (self.patience + 1)
        return sum(self.caps)

    def remedy(self, needed: int) -> str:
        if self.epochs_per_stage == "auto":
            return f"each stage needs one epoch at least; set trainer.max_epochs={needed} or more"
        if self.epochs_per_stage is None:
            return (f"uncapped stages (strategy.epochs_per_stage=null) need at least {needed}; set "
                    "strategy.epochs_per_stage=auto to split trainer.max_epochs over the stages")
        return (f"set trainer.max_epochs={needed} or strategy.epochs_per_stage=auto (trainer.max_epochs split over "
                "the stages)")

    def on_epoch_start(self, epoch: int, model: TransferModel) -> bool:
        if self.restore is not None:
            model.load_state_dict(self.restore)
            self.restore = None
        return super().on_epoch_start(epoch, model)

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        return super().param_groups(model, lr if self.stage == 0 else lr * self.next_lr_mult)

    def on_epoch_end(self, epoch: int, model: TransferModel, val: Optional[Mapping[str, float]]) -> bool:
        super().on_epoch_end(epoch, model, val)
        if not self.caps:
            raise RuntimeError("chain_thaw trained before its plan: the loop calls Strategy.plan before setup")
        self.epochs_in_stage += 1
        if val is not None:  # an epoch trainer.val_every skipped counts towards the cap only
            if val["loss"] < self.best_loss:
                self.best_loss, self.since_best = val["loss"], 0
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                self.since_best += 1
        if self.since_best < self.patience and self.epochs_in_stage != self.caps[self.stage]:
            return False
        self.restore = self.best_weights
        self.stage += 1
        self.epochs_in_stage, self.since_best, self.best_loss, self.best_weights = 0, 0, math.inf, None
        return self.stage == len(self.caps)

    def stages_completed(self) -> int:
        return self.stage

    STATE = ("stage", "epochs_in_stage", "since_best", "best_loss", "best_weights", "restore")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **{key: getattr(self, key) for key in self.STATE}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for key in self.STATE:
            setattr(self, key, state[key])
