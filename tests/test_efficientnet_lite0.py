"""backbone=efficientnet_lite0: the packaged ImageNet weights really are loaded right.

A wrong mapping cannot pass: the top-1 ImageNet class of two photos that scikit-learn ships must be
what the photos show. (timm's `efficientnet_lite0`, the same weights in the PyTorch-padding variant
with ImageNet's mean/std, already calls the flower a lampshade.)
"""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from timm.data import ImageNetInfo, create_transform

from transfer_cli.backbones import build_backbone
from transfer_cli.errors import TransferCliError
from tests.test_backbones import backbone_cfg, one_line_error


@pytest.fixture(scope="module")
def lite0():
    return build_backbone(backbone_cfg("efficientnet_lite0"), 10).eval()


def test_preprocessing_is_the_tensorflow_ports(lite0):
    assert lite0.preprocessing == {"input_size": (3, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                                   "interpolation": "bicubic", "crop_pct": 0.875}
    assert lite0.head.out_features == 10 and lite0.feature_dim == 1280


@pytest.mark.parametrize("photo, imagenet_class", [("china.jpg", "palace"), ("flower.jpg", "daisy")])
def test_imagenet_top1_on_scikit_learns_photos(lite0, photo, imagenet_class):
    transform = create_transform(**lite0.preprocessing)  # resize to 256, centre crop 224, as timm evaluates
    batch = {"pixel_values": transform(Image.fromarray(load_sample_image(photo))).unsqueeze(0)}
    with torch.no_grad():
        logits = lite0.source_head()(lite0.features(batch))
    assert logits.shape == (1, 1000)
    assert ImageNetInfo().index_to_description(int(logits.argmax())) == imagenet_class


def test_random_init_has_no_source_head_and_other_names_are_refused():
    assert build_backbone(backbone_cfg("efficientnet_lite0", pretrained=False), 10).source_head() is None
    with pytest.raises(TransferCliError) as excinfo:
        build_backbone(backbone_cfg("efficientnet_lite0", name="efficientnet_lite0"), 10)
    assert "leave backbone.name=tf_efficientnet_lite0" in one_line_error(excinfo)
