"""Regularizer terms: what a run adds to the task loss, as small objects any strategy can hold.

A run is a strategy (what trains when, how the model runs) plus a list of terms (what is added to the
loss): `strategy=gradual_unfreeze regularizers=[l2sp,bss]`. Each term owns its state (L2-SP's w⁰, DELTA's
reference model and attention), sees the training forward pass through `observe` (BSS needs the
features the head reads, DELTA the groups' feature maps) and returns named penalties, logged as
`train_penalty/<name>`. Composition instead of inheritance: a new pairing needs no new class.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ContextManager, Mapping

import torch
from omegaconf import DictConfig

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.registry import Registry


class Regularizer:
    """One loss term. `cfg` is its config node (`regularizers.<name>`, or the strategy's own node for
    the flat strategies `strategy=l2sp|delta|bss`)."""

    #: True when the term replaces weight decay (L2-SP, DELTA): every optimizer group then gets weight_decay 0
    replaces_weight_decay = False
    #: True when `penalty` needs the batch's raw inputs (DELTA runs the pretrained model on them), so the
    #: schedules' frozen-feature cache, which serves stored features instead, cannot be used with it
    needs_inputs = False

    def __init__(self, name: str, cfg: DictConfig):
        self.name = name
        self.cfg = cfg

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        """Prepare before the first epoch, after the strategy's own setup (snapshot w⁰, build references)."""

    def observe(self, model: TransferModel) -> ContextManager[None]:
        """Hooks active during one training forward pass, to keep what `penalty` needs from it."""
        return nullcontext()

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """The term's loss values by name, for this training batch."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; called before `setup`, which must then keep the restored state."""


REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


def config_key(cfg: DictConfig, field: str) -> str:
    """The full config key of `field` in a term's node (strategy.layers, regularizers.delta.layers), for
    error messages that name what the user typed."""
    return cfg._get_full_key(field) or field
