"""What every parameter-efficient strategy shares: the body frozen at its pretrained weights, the
method's own parameters and the head trained, and what results.json says about them."""
from __future__ import annotations

import copy
from typing import Any

import torch

from transfer_cli.backbones.model import HEAD, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import Strategy


class PeftStrategy(Strategy):
    """The body's groups are frozen with their BatchNorm statistics (`set_trainable(..., False)`), so the
    body is bit-identical after training; `adapt` then adds or selects the method's parameters, and
    `TransferModel.regroup` puts each in the layer group of the module it adapts, so `param_groups`
    (the base one: frozen parameters are left out, layer decay and the head's rate apply) trains
    exactly those and the head.
    """

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        self.model: TransferModel | None = None
        self.lr_mult = rate_multiplier(cfg.lr_mult, str(optim.get("name", "")))

    def adapt(self, model: TransferModel) -> dict[str, str]:
        """Add (or unfreeze) the method's parameters, trainable; return, for new parameters outside the
        body's modules, the module each adapts (see `TransferModel.regroup`)."""
        raise NotImplementedError

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        self.model = model
        if getattr(model, "peft_method", None) != self.cfg.name:  # not set up before (prepare runs twice)
            for group in model.body_group_names():
                model.set_trainable(group, False)
            model.regroup(self.adapt(model))
            model.to(device)
            model.peft_method = self.cfg.name
        super().setup(model, train_loader, device)

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        """The base groups at `strategy.lr_mult` times the run's rate, the head's included (see `rate_multiplier`)."""
        return super().param_groups(model, lr * self.lr_mult)

    def method_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters that are not the head's: what this method adds to the pretrained body."""
        head = set(self.model.group(HEAD).parameter_names)
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad and n not in head}

    def results(self) -> dict[str, Any]:
        return {"peft": {"method": str(self.cfg.get("method", self.cfg.name)),
                         "parameters": sum(p.numel() for p in self.method_parameters().values())}}


#: optimizers whose step per parameter is about the rate whatever the gradient's size (Adam-type), the kind
#: the PEFT papers' rates were set with
ADAPTIVE_OPTIMIZERS = ("adamw",)


def rate_multiplier(lr_mult: Any, optimizer: str) -> float:
    """`strategy.lr_mult`; `auto`: 10 with AdamW, 1 with SGD. `optim.lr` is set for fine-tuning, and the PEFT
    papers train their few parameters at 10-50x full fine-tuning's rate, all with Adam-type optimizers (at
    AdamW's 1x they underfit here). SGD's step grows with the gradient: at 10x its rate LoRA on
    EfficientNet-Lite0 diverged, so it keeps the fine-tuning rate."""
    if str(lr_mult) == "auto":
        return 10.0 if optimizer in ADAPTIVE_OPTIMIZERS else 1.0
    try:
        return float(lr_mult)
    except (TypeError, ValueError):
        raise TransferCliError(f"strategy.lr_mult={lr_mult!r} is not a number; give one (10) or auto") from None


def not_in_the_backbone(what: str) -> str:
    """The export caveat of a method whose additions cannot be folded into the body's layers."""
    return (f"the {what} are not part of a backbone: the exported body is the pretrained one, so the file alone "
            "does not reproduce this run (its checkpoints do)")


def plain_copy(model: TransferModel) -> TransferModel:
    """A deep copy of the model to fold the method into for export (the preprocessing, e.g. a tokenizer, shared)."""
    return copy.deepcopy(model, memo={id(model.preprocessing): model.preprocessing})
