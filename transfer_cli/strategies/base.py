"""The Strategy interface: the only way a transfer method talks to the training loop.

The loop calls these hooks and never asks which strategy it runs. A strategy that only decides
what trains overrides `setup` / `on_epoch_start`; a router overrides `forward`. What is added to the
loss are regularizer terms (`regularizers/base.py`) the strategy holds: the base class sets them up,
lets them observe the training forward pass, adds their penalties and keeps their state, so every
strategy can carry any of them.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig

from transfer_cli.backbones.model import HEAD, Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.registry import Registry

if TYPE_CHECKING:
    from transfer_cli.strategies.regularizers.base import Regularizer

STRATEGIES: Registry["Strategy"] = Registry("strategy")


class Strategy:
    """Default behaviour: every group trains, plain forward, no extra loss.

    Args:
        cfg: the `strategy` config node (its fields are this strategy's hyperparameters).
        optim: the `optim` config node; `head_lr_mult` and `layer_decay` shape the per-group rates.
        regularizers: the loss terms this run adds (`build_strategy` makes them from the config).

    Subclasses that override `setup`, `penalty`, `state_dict` or `load_state_dict` call the base
    method too, so the terms keep working.
    """

    #: True when the model's body should keep the pretrained weights (False: random init).
    pretrained_body = True
    #: what `transfer-cli export` must tell the user when the exported body is not the whole trained
    #: model (None: it is)
    export_caveat: str | None = None
    #: why this strategy cannot hold regularizer terms (None: it can)
    refuses_regularizers: str | None = None

    def __init__(self, cfg: DictConfig, optim: DictConfig, regularizers: Sequence["Regularizer"] = ()):
        self.cfg = cfg
        self.head_lr_mult = float(optim.get("head_lr_mult", 1.0))
        self.layer_decay = float(optim.get("layer_decay", 1.0))
        if regularizers and self.refuses_regularizers:
            raise TransferCliError(f"strategy={cfg.name} cannot hold regularizers "
                                   f"({', '.join(r.name for r in regularizers)}): {self.refuses_regularizers}")
        self.regularizers = list(regularizers)

    @classmethod
    def own_regularizers(cls, cfg: DictConfig) -> list["Regularizer"]:
        """The terms this strategy is made of, from its own config (strategy=l2sp: the l2sp term)."""
        return []

    def regularizer(self, name: str) -> "Regularizer":
        """The held term called `name`."""
        for term in self.regularizers:
            if term.name == name:
                return term
        raise KeyError(name)

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        """Prepare the model before the first epoch (freeze, build policy nets, prune, ...). Subclasses
        do their own work first, then call this, which sets up the terms on the finished model."""
        for term in self.regularizers:
            term.setup(model, train_loader, device)

    def plan(self, model: TransferModel, max_epochs: int) -> Optional[str]:
        """Learn the run's epoch budget before `setup` (chain-thaw sizes its stages from it); return one
        line when the strategy cannot finish within `max_epochs` (the loop prints it), None when it can."""
        return None

    def wrap_loader(self, split: str, loader: Any) -> Any:
        """The loader the loop iterates for `split` (train, val or test), after `setup`; feature caching
        serves precomputed features through it. Subclasses wrap first, then call this: the terms wrap last."""
        for term in self.regularizers:
            loader = term.wrap_loader(split, loader)
        return loader

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        """One optimizer group per trainable layer group; frozen groups are absent.

        Discriminative fine-tuning (ULMFiT, eq. 2: η_{l-1} = η_l / 2.6): with `layer_decay` = d the
        group directly below the head trains at lr / d, the next one down at lr / d², and so on. The
        head trains at lr * head_lr_mult; the multiplier is for the new layer alone (ULMFiT has none,
        head_lr_mult = 1), so the body's rates decay from lr, not from the head's rate.
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
                depth_below_head = len(body) - body.index(name)  # 1 for the group directly below the head
                group_lr = lr / (self.layer_decay**depth_below_head)
            groups.append({"name": name, "params": params, "lr": group_lr})
        if any(term.replaces_weight_decay for term in self.regularizers):
            groups = [{**g, "weight_decay": 0.0} for g in groups]
        return groups + [g for term in self.regularizers for g in term.param_groups(model, lr)]

    def on_epoch_start(self, epoch: int, model: TransferModel) -> bool:
        """Change what trains at this epoch; return True when the optimizer must be rebuilt."""
        return False

    def fit_epoch(self, epoch: int, model: TransferModel) -> Optional[dict[str, Any]]:
        """Train epoch `epoch` with the strategy's own solver instead of the loop's gradient steps (the
        L-BFGS linear probe); return what the loop's epoch returns (train loss, acc1, samples,
        samples_per_s). None, the default: the loop trains."""
        return None

    def on_epoch_end(self, epoch: int, model: TransferModel, val: Optional[Mapping[str, float]]) -> bool:
        """See the epoch's validation metrics (early-stopped stages; None: an epoch that
        `trainer.val_every` did not validate); return True to end training."""
        return False

    def epoch_stats(self) -> dict[str, float]:
        """Numbers about the epoch just trained (e.g. how often each block was routed to its fine-tuned
        copy), merged into its metrics.jsonl line; called once per epoch, after training."""
        return {k: v for term in self.regularizers for k, v in term.epoch_stats().items()}

    def on_step_end(self, model: TransferModel, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
        """After each optimizer step, on the batch it used: work that needs the updated weights (L2T-ww's
        look-ahead steps and meta-update); the terms' by default."""
        for term in self.regularizers:
            term.on_step_end(model, batch, optimizer)

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return model(batch)

    @contextmanager
    def observing(self, model: TransferModel) -> Iterator[None]:
        """Around a training forward pass: the terms keep what their penalties need (features, maps)."""
        with ExitStack() as stack:
            for term in self.regularizers:
                stack.enter_context(term.observe(model))
            yield

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra loss terms by name; they are added to the task loss and logged per epoch."""
        terms: dict[str, torch.Tensor] = {}
        for term in self.regularizers:
            terms.update(term.penalty(model, batch, logits))
        return terms

    def results(self) -> dict[str, Any]:
        """Sections this strategy adds to results.json (TransTailor: `pruning`); none by default."""
        return {}

    def export_model(self, model: TransferModel) -> TransferModel:
        """The model whose body `transfer-cli export` writes: `model` itself, or a plain copy with what the
        strategy added folded into the body's own layers (LoRA merged); `export_caveat` says what is lost."""
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"regularizers": {term.name: term.state_dict() for term in self.regularizers}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`. Resume and `eval` call it before `setup`, which must then build from the
        restored state (θ0, attention, a pruned structure) instead of computing it afresh."""
        saved = state.get("regularizers", {})
        for term in self.regularizers:
            if term.name in saved:
                term.load_state_dict(saved[term.name])
