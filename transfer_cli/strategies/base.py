"""The Strategy interface: the only way a transfer method talks to the training loop.

The loop calls these hooks and never asks which strategy it runs. A strategy that only decides
what trains overrides `setup` / `on_epoch_start`; a regulariser adds `penalty`; a router overrides
`forward`.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from omegaconf import DictConfig

from transfer_cli.backbones.model import HEAD, Batch, TransferModel
from transfer_cli.registry import Registry

STRATEGIES: Registry["Strategy"] = Registry("strategy")


class Strategy:
    """Default behaviour: every group trains, plain forward, no extra loss.

    Args:
        cfg: the `strategy` config node (its fields are this strategy's hyperparameters).
        optim: the `optim` config node; `head_lr_mult` and `layer_decay` shape the per-group rates.
    """

    #: True when the model's body should keep the pretrained weights (False: random init).
    pretrained_body = True
    #: what `transfer-cli export` must tell the user when the exported body is not the whole trained
    #: model (None: it is)
    export_caveat: str | None = None

    def __init__(self, cfg: DictConfig, optim: DictConfig):
        self.cfg = cfg
        self.head_lr_mult = float(optim.get("head_lr_mult", 1.0))
        self.layer_decay = float(optim.get("layer_decay", 1.0))

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        """Prepare the model before the first epoch (freeze, snapshot θ0, build policy nets, ...)."""

    def wrap_loader(self, split: str, loader: Any) -> Any:
        """The loader the loop iterates for `split` (train, val or test), after `setup`; feature caching
        serves precomputed features through it."""
        return loader

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        """One optimizer group per trainable layer group; frozen groups are absent.

        The head gets `lr * head_lr_mult`; with `layer_decay` = d, each body group's rate is the
        rate of the group above it divided by d (ULMFiT's discriminative fine-tuning).
        """
        names = model.group_names()
        body = names[:-1]
        groups = []
        for name in names:
            params = [p for p in model.group(name).parameters(model) if p.requires_grad]
            if not params:
                continue
            if name == HEAD:
                group_lr = lr * self.head_lr_mult
            else:
                depth_below_head = len(body) - body.index(name) - 1
                group_lr = lr / (self.layer_decay**depth_below_head)
            groups.append({"name": name, "params": params, "lr": group_lr})
        return groups

    def on_epoch_start(self, epoch: int, model: TransferModel) -> bool:
        """Change what trains at this epoch; return True when the optimizer must be rebuilt."""
        return False

    def on_epoch_end(self, epoch: int, model: TransferModel, val: Mapping[str, float]) -> bool:
        """See the epoch's validation metrics (early-stopped stages); return True to end training."""
        return False

    def epoch_stats(self) -> dict[str, float]:
        """Numbers about the epoch just trained (e.g. how often each block was routed to its fine-tuned
        copy), merged into its metrics.jsonl line; called once per epoch, after training."""
        return {}

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return model(batch)

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra loss terms by name; they are added to the task loss and logged per epoch."""
        return {}

    def results(self) -> dict[str, Any]:
        """Sections this strategy adds to results.json (TransTailor: `pruning`); none by default."""
        return {}

    def export_model(self, model: TransferModel) -> TransferModel:
        """The model whose body `transfer-cli export` writes: `model` itself, or a plain copy with what the
        strategy added folded into the body's own layers (LoRA merged); `export_caveat` says what is lost."""
        return model

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. Resume and `eval` call it before `setup`, which must then build from the
        restored state (θ0, attention, a pruned structure) instead of computing it afresh."""
