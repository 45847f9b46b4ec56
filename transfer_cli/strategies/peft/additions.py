"""Modules a parameter-efficient method adds beside the body (adapters, prompts, scales and shifts).

They run through hooks on the body's own modules and live in `model.peft`, a submodule of the model:
they move with it, are in its state dict (`last.pt` resumes them, `best.pt` restores them for `eval`)
and are named for the optimizer, while the body's modules and parameter names stay those of the
plain backbone, which is what `export` writes. Every hook is a bound method of its module, so a deep
copy of the model copies the hooks with their modules.
"""
from __future__ import annotations

from typing import Sequence

import timm.layers as timm_layers
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from transfer_cli.backbones.model import TransferModel

CONTAINER = "peft"


class Added(nn.Module):
    """One added module. `target`: the dotted name, in the model, of the module it adapts; its parameters
    join that module's layer group (so `optim.layer_decay` gives them that layer's rate)."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self._handles: list[RemovableHandle] = []

    def attach(self, model: TransferModel) -> None:
        """Register this module's hooks on the model (via `keep`)."""
        raise NotImplementedError

    def keep(self, handle: RemovableHandle) -> None:
        self._handles.append(handle)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def add_modules(model: TransferModel, modules: Sequence[Added]) -> dict[str, str]:
    """Put `modules` into `model.peft` and attach them; returns what `TransferModel.regroup` adopts
    (each new parameter's name -> the module it adapts)."""
    container = nn.ModuleDict()
    for module in modules:
        key = module.target.replace(".", "_")
        if key in container:
            raise ValueError(f"two added modules adapt {module.target}")
        container[key] = module
    model.add_module(CONTAINER, container)
    for module in modules:
        module.attach(model)
    return {f"{CONTAINER}.{key}.{name}": module.target
            for key, module in container.items() for name, _ in module.named_parameters()}


def added_modules(model: TransferModel) -> list[Added]:
    container = getattr(model, CONTAINER, None)
    return list(container.values()) if isinstance(container, nn.ModuleDict) else []


def strip(model: TransferModel) -> None:
    """Remove every added module and its hooks (from a copy being exported): the plain backbone is left."""
    for module in added_modules(model):
        module.detach()
    if hasattr(model, CONTAINER):
        delattr(model, CONTAINER)


#: layers whose output keeps its channels in dim 1 (B, C, H, W); every other layer keeps them last
CHANNELS_FIRST = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, timm_layers.LayerNorm2d,
                  timm_layers.LayerNorm2dFp32, timm_layers.LayerNormAct2d, timm_layers.LayerNormAct2dFp32)


def channel_axis(module: nn.Module) -> int:
    """Where a layer's output keeps its channels."""
    return 1 if isinstance(module, CHANNELS_FIRST) else -1


def first_output(output: object) -> torch.Tensor:
    """A module's main output: the tensor itself, or the first element of a tuple (Hugging Face layers)."""
    return output[0] if isinstance(output, tuple) else output


def replace_first(output: object, value: torch.Tensor) -> object:
    return (value, *output[1:]) if isinstance(output, tuple) else value
