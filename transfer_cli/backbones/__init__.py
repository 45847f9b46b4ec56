"""Backbones: build a TransferModel (pretrained body + new head, named layer groups) from `cfg.backbone`.

Each family registers a builder in BACKBONES (`backbones/registry.py`) under the `kind` its config
names; `transfer-cli list` prints the first line of each builder's docstring.
"""
from __future__ import annotations

from omegaconf import DictConfig

from transfer_cli.backbones.model import TransferModel
from transfer_cli.backbones.registry import BACKBONES, few, first_line

__all__ = ["BACKBONES", "build_backbone", "few", "first_line"]


def build_backbone(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> TransferModel:
    """Build the model for `num_classes` targets; pretrained=False is the same architecture, randomly initialised."""
    return BACKBONES.get(cfg.kind)(cfg, num_classes, pretrained)


# Imported for their effect: each registers its builders in BACKBONES.
from transfer_cli.backbones import efficientnet_lite0, hf_backbone, timm_backbone  # noqa: E402,F401
