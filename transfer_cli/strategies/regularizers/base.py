"""Regularizer terms: what a run adds to the task loss, as small objects any strategy can hold.

A run is a strategy (what trains when, how the model runs) plus a list of terms (what is added to the
loss): `strategy=gradual_unfreeze regularizers=[l2sp,bss]`. Each term owns its state (L2-SP's w⁰, DELTA's
reference model and attention), sees the training forward pass through `observe` (BSS needs the
features the head reads, DELTA the groups' feature maps) and returns named penalties, logged as
`train_penalty/<name>`. Composition instead of inheritance: a new pairing needs no new class.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator, Mapping

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

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        """Optimizer groups for what the term trains besides the model's layer groups (Co-Tuning's source
        head, Bi-Tuning's projector, L2T-ww's regressors). Those modules are attached to the model
        (`attach`), so checkpoints hold them and their optimizer state resumes by name."""
        return []

    def wrap_loader(self, split: str, loader: Any) -> Any:
        """The loader the loop iterates for `split`, after the strategy's own wrapping (LwF adds each
        example's index, to find the source outputs it stored for it)."""
        return loader

    def on_step_end(self, model: TransferModel, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
        """After each optimizer step, on the same batch (L2T-ww's look-ahead steps and meta-update)."""

    def epoch_stats(self) -> dict[str, float]:
        """Numbers about the epoch just trained, merged into its metrics.jsonl line (Hybrid Forward's
        per-path losses); called once per epoch."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`; called before `setup`, which must then keep the restored state."""


class HeadInputTerm(Regularizer):
    """A term whose penalty reads the features the head read in the training forward pass (kept by a
    hook, never a second forward: whatever runs the body, a feature cache included)."""

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self._seen: dict[str, torch.Tensor] = {}

    @contextmanager
    def observe(self, model: TransferModel) -> Iterator[None]:
        def keep(_head, inputs):
            self._seen["features"] = inputs[0]

        handle = model.head.register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def head_input(self) -> torch.Tensor:
        """The features of the forward pass just observed (once)."""
        return self._seen.pop("features")


class EpochMeans:
    """Per-epoch means of values a term records every step, for `epoch_stats`; summed on the device, so a
    step never waits for it."""

    def __init__(self, prefix: str):
        self.prefix, self.sums, self.steps = prefix, {}, 0

    def add(self, values: Mapping[str, torch.Tensor]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach()
        self.steps += 1

    def pop(self) -> dict[str, float]:
        means = {f"{self.prefix}/{k}": float(v) / self.steps for k, v in self.sums.items()} if self.steps else {}
        self.sums, self.steps = {}, 0
        return means


#: where a term's trainable modules sit in the model: `model.term_<name>`
TERM_PREFIX = "term_"


def attach(model: TransferModel, term: Regularizer, module: torch.nn.Module) -> torch.nn.Module:
    """Make `module` (trained with the model) a submodule of the model, outside every layer group, so that
    checkpoints, best.pt and the optimizer state by name cover it."""
    model.add_module(f"{TERM_PREFIX}{term.name}", module)
    return module


REGULARIZERS: Registry[type[Regularizer]] = Registry("regularizer")


def config_key(cfg: DictConfig, field: str) -> str:
    """The full config key of `field` in a term's node (strategy.layers, regularizers.delta.layers), for
    error messages that name what the user typed."""
    return cfg._get_full_key(field) or field
