"""What layer schedules share: set exactly a given set of groups trainable, once per epoch.

A schedule only says which groups train at an epoch (`trainable_at`); applying it here, in
`on_epoch_start`, before every epoch and again on resume, keeps the loop's optimizer in step with it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

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
    """A strategy whose trainable groups follow a schedule of stages; subclasses say which groups each
    stage trains (`stages`) and which stage an epoch is in (`stage_at`).

    The stages and how many epochs each has trained so far go into results.json (`schedule`) and each
    epoch's stage into metrics.jsonl, so a run shows whether it got through its schedule; `plan` says
    at the start, in one line, when trainer.max_epochs is too short for it.

    While the bottom groups are frozen their outputs are cached (`cache_features`, feature_cache.py),
    a new cache for each stage's frozen prefix, unless a regularizer term needs the raw inputs (DELTA).
    """

    def __init__(self, cfg: DictConfig, optim: DictConfig, regularizers: Sequence[Any] = ()):
        super().__init__(cfg, optim, regularizers)
        self.freeze_bn = freezes_bn(cfg)
        self.cache = FeatureCache(self._cache_setting(cfg.get("cache_features", False)))
        self.stage_epochs: list[int] = []  # epochs trained in each stage so far
        self.stage_names: list[list[str]] = []  # the stages of the planned model, for results.json
        self._stage = 0  # the stage of the epoch being trained

    def _cache_setting(self, setting: Any) -> Any:
        """cache_features, turned off when a term runs on the raw inputs the cache replaces."""
        needing = [term.name for term in self.regularizers if term.needs_inputs]
        if not needing:
            return setting
        if setting is True:
            raise TransferCliError(f"strategy.cache_features=true cannot serve regularizer {needing[0]}, which runs "
                                   "the pretrained model on each batch's inputs; set strategy.cache_features=auto")
        return False

    # ---- the schedule: subclasses -------------------------------------------------------------
    def stages(self, model: TransferModel) -> list[list[str]]:
        """The trainable groups of each stage, in order."""
        raise NotImplementedError

    def stage_at(self, epoch: int, count: int) -> int:
        """The stage (an index into `stages`, of which there are `count`) epoch `epoch` trains in."""
        raise NotImplementedError

    def epochs_needed(self, model: TransferModel) -> int:
        """Epochs until the last stage has trained one epoch (the first epoch at the last stage + 1)."""
        count, epoch = len(self.stages(model)), 0
        while self.stage_at(epoch, count) < count - 1:
            epoch += 1
        return epoch + 1

    def remedy(self, needed: int) -> str:
        """How to make the schedule fit, for the `plan` note."""
        return f"set trainer.max_epochs={needed}"

    # ---- the hooks -----------------------------------------------------------------------------
    def plan(self, model: TransferModel, max_epochs: int) -> Optional[str]:
        self.stage_names = self.stages(model)
        needed = self.epochs_needed(model)
        if needed <= max_epochs or len(self.stage_names) < 2:
            return None
        return (f"strategy={self.cfg.name} needs {needed} epochs to reach the last of its {len(self.stage_names)} "
                f"stages, but trainer.max_epochs={max_epochs} ends the run before: {self.remedy(needed)}")

    def trainable_at(self, epoch: int, model: TransferModel) -> list[str]:
        stages = self.stages(model)
        return stages[self.stage_at(epoch, len(stages))]

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        self.cache.bind(model, device)
        super().setup(model, train_loader, device)

    def wrap_loader(self, split: str, loader: Any) -> Any:
        return super().wrap_loader(split, self.cache.wrap(split, loader))

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return self.cache.forward(model, batch)

    def on_epoch_start(self, epoch: int, model: TransferModel) -> bool:
        stages = self.stages(model)
        self._stage = self.stage_at(epoch, len(stages))
        return train_exactly(model, stages[self._stage], self.freeze_bn)

    def on_epoch_end(self, epoch: int, model: TransferModel, val: Optional[Mapping[str, float]]) -> bool:
        self.stage_epochs += [0] * (self._stage + 1 - len(self.stage_epochs))
        self.stage_epochs[self._stage] += 1
        return False

    def epoch_stats(self) -> dict[str, float]:
        return {"stage": self._stage + 1} if len(self.stage_names) > 1 else {}

    def stages_completed(self) -> int:
        """Stages the run went through: those before the stage of its last epoch, and that one too when the
        epoch after would have been in the next stage or it is the open-ended last stage."""
        trained = sum(self.stage_epochs)
        if not trained:
            return 0
        count = len(self.stage_names)
        stage = self.stage_at(trained - 1, count)
        return stage + 1 if stage == count - 1 or self.stage_at(trained, count) > stage else stage

    def results(self) -> dict[str, Any]:
        if len(self.stage_names) < 2:
            return super().results()
        epochs = self.stage_epochs + [0] * (len(self.stage_names) - len(self.stage_epochs))
        return {**super().results(), "schedule": {
            "stages": len(self.stage_names), "completed": self.stages_completed(), "epochs_per_stage": epochs,
            "trainable": self.stage_names}}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stage_epochs": list(self.stage_epochs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.stage_epochs = list(state.get("stage_epochs", []))
