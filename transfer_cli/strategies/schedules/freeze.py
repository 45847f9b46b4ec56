"""Freezing: a linear probe (`groups: all`) or the bottom k layer groups frozen.

Frozen means requires_grad=False, absent from the optimizer (so no momentum or weight-decay drift),
and by default BatchNorm running statistics frozen too (`bn: freeze`), so frozen groups are
bit-identical after training.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import ListConfig

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.schedules.feature_cache import frozen_prefix
from transfer_cli.strategies.schedules.schedule import LayerSchedule, train_exactly


def frozen_group_names(model: TransferModel, spec: Any) -> list[str]:
    """Resolve `groups`: "all" (the whole body), an int k (the bottom k groups) or a list of names."""
    body = model.body_group_names()
    if spec == "all":
        return body
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 0 <= spec <= len(body):
            raise TransferCliError(f"strategy.groups={spec}: this model has {len(body)} body groups; use 0..{len(body)}")
        return body[:spec]
    if isinstance(spec, (list, tuple, ListConfig)):
        for name in spec:
            model.group(str(name))  # raises with the valid names
        return [str(n) for n in spec]
    raise TransferCliError(f"strategy.groups={spec!r}; use all, a number k (bottom k groups) or a list of group names")


@STRATEGIES.register("freeze")
class Freeze(LayerSchedule):
    """Freeze the body (linear probe) or its bottom k groups and train the rest.

    The simplest schedule: the same groups train at every epoch. `cache_features` (see feature_cache.py):
    the frozen bottom groups run once per example.
    """

    def stages(self, model: TransferModel) -> list[list[str]]:
        frozen = set(frozen_group_names(model, self.cfg.groups))
        return [[name for name in model.group_names() if name not in frozen]]

    def stage_at(self, epoch: int, count: int) -> int:
        return 0

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        train_exactly(model, self.trainable_at(0, model), self.freeze_bn)
        if self.cache.required and not frozen_prefix(model):
            raise TransferCliError(f"strategy.cache_features=true, but strategy.groups={self.cfg.groups} freezes no "
                                   "bottom group, so there is nothing to cache; freeze the bottom k groups or the body")
        super().setup(model, train_loader, device)
