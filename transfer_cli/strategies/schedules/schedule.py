"""What layer schedules share: set exactly a given set of groups trainable, once per epoch.

A schedule only says which groups train at an epoch (`trainable_at`); applying it here, in
`on_epoch_start`, before every epoch and again on resume, keeps the loop's optimizer in step with it.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import Strategy
from transfer_cli.strategies.schedules.feature_cache import FeatureCache


def freezes_bn(cfg: DictConfig) -> bool:
    """Read `bn`: freeze (frozen groups keep their BatchNorm statistics) or train (they keep updating)."""
    bn = str(cfg.bn)
    if bn not in ("freeze", "train"):
        raise TransferCliError(f"strategy.bn={bn!r}; use freeze (running statistics fixed) or train")
    return bn == "freeze"


def train_exactly(model: TransferModel, names: Sequence[str], freeze_bn: bool) -> bool:
    """Make `names` the trainable groups and every other group frozen; True when that changed anything."""
    before = model.trainable_group_names()
    for name in model.group_names():
        model.set_trainable(name, name in names, freeze_bn=freeze_bn)
    return model.trainable_group_names() != before


def positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TransferCliError(f"strategy.{key}={value!r}; use a whole number >= {minimum}")
    return value


class LayerSchedule(Strategy):
    """A strategy whose trainable groups follow a schedule; subclasses say which train when.

    While the bottom groups are frozen their outputs are cached (`cache_features`, feature_cache.py),
    a new cache for each stage's frozen prefix, unless a regularizer term needs the raw inputs (DELTA).
    """

    def __init__(self, cfg: DictConfig, optim: DictConfig, regularizers: Sequence[Any] = ()):
        super().__init__(cfg, optim, regularizers)
        self.freeze_bn = freezes_bn(cfg)
        self.cache = FeatureCache(self._cache_setting(cfg.get("cache_features", False)))

    def _cache_setting(self, setting: Any) -> Any:
        """cache_features, turned off when a term runs on the raw inputs the cache replaces."""
        needing = [term.name for term in self.regularizers if term.needs_inputs]
        if not needing:
            return setting
        if setting is True:
            raise TransferCliError(f"strategy.cache_features=true cannot serve regularizer {needing[0]}, which runs "
                                   "the pretrained model on each batch's inputs; set strategy.cache_features=auto")
        return False

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        self.cache.bind(model, device)
        super().setup(model, train_loader, device)

    def wrap_loader(self, split: str, loader: Any) -> Any:
        return super().wrap_loader(split, self.cache.wrap(split, loader))

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return self.cache.forward(model, batch)

    def trainable_at(self, epoch: int, model: TransferModel) -> list[str]:
        raise NotImplementedError

    def on_epoch_start(self, epoch: int, model: TransferModel) -> bool:
        return train_exactly(model, self.trainable_at(epoch, model), self.freeze_bn)
