"""Backbones: build a TransferModel (pretrained body + new head, named layer groups) from `cfg.backbone`.

Each family registers a builder under the `kind` its config names; `transfer-cli list` prints the
first line of each builder's docstring.
"""
from __future__ import annotations

from omegaconf import DictConfig

from transfer_cli.backbones.model import TransferModel
from transfer_cli.registry import Registry

BACKBONES: Registry[TransferModel] = Registry("backbone")


def build_backbone(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> TransferModel:
    """Build the model for `num_classes` targets; pretrained=False is the same architecture, randomly initialised."""
    return BACKBONES.get(cfg.kind)(cfg, num_classes, pretrained)


def few(names: list[str]) -> str:
    """The first few names of a list, for a one-line message."""
    return ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")


def first_line(error: BaseException) -> str:
    """A library error's first line, to quote inside our own one-line message."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# Imported last: they register into BACKBONES.
from transfer_cli.backbones import efficientnet_lite0, hf_backbone, timm_backbone  # noqa: E402,F401
