"""Freezing: a linear probe (`groups: all`) or the bottom k layer groups frozen.

Frozen means requires_grad=False, absent from the optimizer (so no momentum or weight-decay drift),
and by default BatchNorm running statistics frozen too (`bn: freeze`), so frozen groups are
bit-identical after training.

A linear probe is fit by L-BFGS on the cached features with its L2 strength chosen on validation
(`solver: lbfgs`, probe.py, Kornblith et al. 2019) or by the loop's SGD epochs (`solver: sgd`);
`auto` takes L-BFGS whenever the whole body is frozen and its features can be computed once (no
augmentation). The probe's features are the evaluation-mode ones (no dropout), as for val and test.
"""
from __future__ import annotations

import time
from typing import Any, Mapping, Optional

import torch
from omegaconf import ListConfig

from transfer_cli.backbones.model import HEAD, TransferModel
from transfer_cli.engine import distributed
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.schedules.feature_cache import frozen_prefix
from transfer_cli.strategies.schedules.probe import l2_grid, select_probe
from transfer_cli.strategies.schedules.schedule import LayerSchedule, positive_int, train_exactly

SOLVERS = ("auto", "lbfgs", "sgd")


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
    """Freeze the body (linear probe, fit by L-BFGS with the L2 strength chosen on validation) or its
    bottom k groups, and train the rest.

    The simplest schedule: the same groups train at every epoch. `cache_features` (see feature_cache.py):
    the frozen bottom groups run once per example.
    """

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        self.solver = str(cfg.get("solver", "sgd"))
        if self.solver not in SOLVERS:
            raise TransferCliError(f"strategy.solver={self.solver!r}; use auto, lbfgs (the probe by L-BFGS) or sgd")
        if self.solver == "lbfgs" and self.regularizers:
            raise TransferCliError("strategy.solver=lbfgs solves the probe's own objective and cannot add regularizer "
                                   f"{self.regularizers[0].name}; use strategy.solver=sgd")
        if self.solver != "sgd":
            self.grid = l2_grid(float(cfg.l2_min), float(cfg.l2_max), positive_int(cfg, "l2_steps"))
            self.max_iter = positive_int(cfg, "max_iter")
        self.loaders: dict[str, Any] = {}
        self.probe: dict[str, Any] = {}  # what results.json records of the probe

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
        if model.trainable_group_names() == [HEAD] and not self.probe:
            # auto: a held regularizer term is a loss L-BFGS's own objective leaves out, so SGD trains with it
            sgd = self.solver == "sgd" or self.cache.setting is False or bool(self.regularizers)
            self.probe = {"solver": "sgd" if sgd else "lbfgs"}
        if self.solver == "lbfgs" and self.probe.get("solver") != "lbfgs":
            why = ("strategy.cache_features=false" if self.cache.setting is False
                   else f"strategy.groups={self.cfg.groups} leaves part of the body training")
            raise TransferCliError(f"strategy.solver=lbfgs fits the head on the frozen body's cached features, but {why}; "
                                   "use strategy.groups=all with strategy.cache_features=auto, or strategy.solver=sgd")
        super().setup(model, train_loader, device)

    def wrap_loader(self, split: str, loader: Any) -> Any:
        self.loaders[split] = loader
        return super().wrap_loader(split, loader)

    def fit_epoch(self, epoch: int, model: TransferModel) -> Optional[dict[str, Any]]:
        """The L-BFGS probe, in place of the first epoch's SGD steps (None: SGD trains)."""
        if self.probe.get("solver") != "lbfgs":
            return None
        if distributed.place().world_size > 1:
            raise TransferCliError("strategy.solver=lbfgs fits the probe in one process; run it without torchrun, "
                                   "or use strategy.solver=sgd")
        started = time.perf_counter()
        was_training = model.training
        model.eval()  # the probe's features, as Kornblith et al.'s: no dropout, BatchNorm's running statistics
        try:
            train = self.cache.lookup("train", self.loaders["train"])
            val = self.cache.lookup("val", self.loaders["val"]) if train is not None else None
        finally:
            model.train(was_training)
        if train is None:
            if self.solver == "lbfgs":
                raise TransferCliError(f"strategy.solver=lbfgs needs the frozen body's features computed once, but "
                                       f"{self.cache.refusal(frozen_prefix(model))}; use strategy.solver=sgd")
            self.probe["solver"] = "sgd"  # auto: features that cannot be cached (augmentation) are probed by SGD
            return None
        best, solved = select_probe((train.features, train.labels), (val.features, val.labels) if val else
                                    (train.features[:0], train.labels[:0]), model.head.out_features, self.grid,
                                    self.max_iter)
        with torch.no_grad():
            model.head.weight.copy_(best.weight)
            model.head.bias.copy_(best.bias)
        self.probe.update(l2=best.l2, iterations=best.iterations, val_acc1=best.val_acc1, val_loss=best.val_loss,
                          searched={"l2": [p.l2 for p in solved], "val_acc1": [p.val_acc1 for p in solved],
                                    "val_loss": [p.val_loss for p in solved]})
        samples = len(train.labels)
        elapsed = time.perf_counter() - started
        return {"loss": best.train_loss, "acc1": best.train_acc1, "samples": samples,
                "samples_per_s": samples / elapsed if elapsed > 0 else 0.0}

    def on_epoch_end(self, epoch: int, model: TransferModel, val: Optional[Mapping[str, float]]) -> bool:
        super().on_epoch_end(epoch, model, val)
        return self.probe.get("solver") == "lbfgs"  # solved to its optimum: nothing left to train

    def epoch_stats(self) -> dict[str, float]:
        return {**super().epoch_stats(), **({"probe_l2": self.probe["l2"]} if "l2" in self.probe else {})}

    def results(self) -> dict[str, Any]:
        return {**super().results(), **({"probe": self.probe} if self.probe else {})}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "probe": self.probe}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.probe = dict(state.get("probe", {}))
