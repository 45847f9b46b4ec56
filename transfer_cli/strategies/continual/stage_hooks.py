"""What a method does between the stages of a class-incremental scenario, beside the loop's own hooks.

The scenario (`transfer_cli/continual/scenario.py`) runs one `Trainer.fit` per stage and, around each,
calls these hooks on the strategy and on every term it holds that has them: `begin_scenario` once on the
freshly built pretrained model (also when a run resumes), `before_stage` before the head grows to the
stage's classes (LwF keeps the model as it was), `after_stage` after the stage's fit, with a loader over
the stage's training examples in a fixed order and without augmentation (prototypes, EWC's Fisher).
Whatever must survive a resume is in the object's `state_dict`, saved after every stage.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from transfer_cli.backbones.model import TransferModel


class StageHooks:
    """Mixed into a strategy or a regularizer term that acts between stages; every hook does nothing by default."""

    def begin_scenario(self, model: TransferModel) -> None:
        """Once per process, on the pretrained model before anything is trained or restored."""

    def before_stage(self, stage: int, model: TransferModel) -> None:
        """Before stage `stage` (its head still the previous stage's size)."""

    def after_stage(self, stage: int, model: TransferModel, loader: Any, device: torch.device) -> None:
        """After stage `stage`'s fit; `loader` serves that stage's training examples (fixed order, no augmentation)."""

    def training_strategy(self, stage: int) -> Optional[Any]:
        """The strategy the loop trains stage `stage` with (None: the stage is not trained)."""
        return self


def stage_hooks(strategy: Any) -> list[StageHooks]:
    """The strategy and the terms it holds that have stage hooks, strategy first."""
    return [x for x in [strategy, *getattr(strategy, "regularizers", [])] if isinstance(x, StageHooks)]


def training_strategy(strategy: Any, stage: int) -> Optional[Any]:
    """What trains stage `stage`: any strategy trains every stage itself, unless its hooks say otherwise."""
    return strategy.training_strategy(stage) if isinstance(strategy, StageHooks) else strategy


def grow_head(model: TransferModel, num_classes: int) -> None:
    """Widen the linear head to `num_classes` outputs: old classes keep their rows, new rows start as
    nn.Linear's own initialisation (drawn from the global generator, which the scenario seeds per stage)."""
    old = model.head
    if old.out_features == num_classes:
        return
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None).to(old.weight.device)
    with torch.no_grad():
        new.weight[:old.out_features] = old.weight
        if old.bias is not None:
            new.bias[:old.out_features] = old.bias
    new.weight.requires_grad_(old.weight.requires_grad)
    if new.bias is not None:
        new.bias.requires_grad_(old.bias.requires_grad)
    model.head = new
    model.regroup()


def outside_a_scenario(strategy: Any) -> Optional[str]:
    """The one-line refusal for a method that only works between stages, run as one plain fit (None: fine)."""
    hooked = stage_hooks(strategy)
    if not hooked:
        return None
    names = ", ".join(getattr(h, "name", None) or f"strategy={h.cfg.name}" for h in hooked)
    return f"{names} acts between the stages of a class-incremental run; add scenario=class_incremental"
