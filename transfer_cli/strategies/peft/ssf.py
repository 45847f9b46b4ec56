"""SSF (Lian et al., "Scaling & Shifting Your Features: A New Baseline for Efficient Model Tuning", NeurIPS 2022).

A per-channel scale γ and shift β after every operation of the body: y ↦ γ ⊙ y + β. The paper puts them
after each linear layer, attention projection, MLP layer and norm of a ViT (LAMDA-PILOT's `vit_ssf`
likewise); here every Linear, Conv2d, LayerNorm, GroupNorm and BatchNorm with a weight and a bias gets one, which
covers a ViT, a BERT-like encoder and a CNN (whose convolutions have no bias: the BatchNorm after
each takes it). Because each sits right after a layer with a bias, it folds into that layer exactly
(W ← γ·W, b ← γ·b + β): `export` writes a plain backbone that reproduces the run.

Departure: the official code initialises γ ~ N(1, 0.02) and β ~ N(0, 0.02); here γ = 1, β = 0, so the
model starts exactly at the pretrained one.
"""
from __future__ import annotations

import torch
from torch import nn

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.peft.additions import (Added, add_modules, added_modules, channel_axis, first_output,
                                                    replace_first, strip)
from transfer_cli.strategies.peft.shared import PeftStrategy, plain_copy

FOLDABLE = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class ScaleShift(Added):
    """γ ⊙ y + β on the output y of the module `target`, per channel; γ = 1, β = 0 at the start.

    timm's norm-and-activation layers (BatchNormAct2d, ...) apply their activation inside: there y is the
    input of their `act`, the norm's own output, so that the map still folds into the norm.
    """

    def __init__(self, target: str, channels: int, axis: int, before_act: bool = False):
        super().__init__(target)
        self.axis, self.before_act = axis, before_act
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def attach(self, model: TransferModel) -> None:
        module = model.get_submodule(self.target)
        if self.before_act:
            self.keep(module.act.register_forward_pre_hook(self.before))
        else:
            self.keep(module.register_forward_hook(self.after))

    def transform(self, y: torch.Tensor) -> torch.Tensor:
        shape = [1] * y.dim()
        shape[self.axis] = -1
        return torch.addcmul(self.shift.view(shape), y, self.scale.view(shape))

    def after(self, _module: nn.Module, _args: tuple, output: object) -> object:
        return replace_first(output, self.transform(first_output(output)))

    def before(self, _act: nn.Module, args: tuple) -> tuple:
        return (self.transform(args[0]), *args[1:])

    @torch.no_grad()
    def fold(self, module: nn.Module) -> None:
        """Fold into the layer it follows: W ← γ·W (per output channel), b ← γ·b + β."""
        module.weight.mul_(self.scale.view(-1, *[1] * (module.weight.dim() - 1)))
        module.bias.mul_(self.scale).add_(self.shift)


def scale_shifts(model: TransferModel, types: tuple[type, ...] = FOLDABLE) -> list[ScaleShift]:
    """A ScaleShift after every layer of `types` in the body that has a weight and a bias to fold it into."""
    added = []
    for name, module in model.body.named_modules():
        if isinstance(module, types) and _has(module, "weight") and _has(module, "bias") and module.bias.dim() == 1:
            before_act = isinstance(getattr(module, "act", None), nn.Module)
            added.append(ScaleShift(f"body.{name}", module.bias.numel(), channel_axis(module), before_act))
    return added


def _has(module: nn.Module, name: str) -> bool:
    return isinstance(getattr(module, name, None), nn.Parameter)


def fold_and_strip(model: TransferModel) -> TransferModel:
    """A copy of the model with every ScaleShift folded into its layer and the rest of what was added removed."""
    plain = plain_copy(model)
    for module in added_modules(plain):
        if isinstance(module, ScaleShift):
            module.fold(plain.get_submodule(module.target))
    strip(plain)
    return plain


@STRATEGIES.register("ssf")
class SSF(PeftStrategy):
    """A trained per-channel scale and shift after every layer of the frozen body; folded into it at export."""

    def adapt(self, model: TransferModel) -> dict[str, str]:
        added = scale_shifts(model)
        if not added:
            raise TransferCliError("strategy=ssf: the backbone has no Linear, Conv2d or norm layer with a bias "
                                   "to scale and shift after")
        return add_modules(model, added)

    def export_model(self, model: TransferModel) -> TransferModel:
        return fold_and_strip(model)
