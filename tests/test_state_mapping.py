"""Weights saved by other libraries: timm's converters, mapping by order, and one-line refusals."""
from __future__ import annotations

import re

import pytest
import timm
import torch
from omegaconf import OmegaConf

from transfer_cli.backbones import build_backbone
from transfer_cli.backbones import timm_backbone
from transfer_cli.errors import TransferCliError
from tests.test_backbones import backbone_cfg, images, one_line_error

NUM_CLASSES = 3


def source_model(name: str) -> torch.nn.Module:
    """A timm model with a 7-class classifier and BatchNorm statistics away from their init."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7)
    model.train()
    with torch.no_grad():
        model(images(n=4, size=model.pretrained_cfg["input_size"][-1], seed=3)["pixel_values"])
    return model.eval()


def load(name: str, path) -> torch.nn.Module:
    return build_backbone(backbone_cfg("timm", name=name, weights=str(path)), NUM_CLASSES).eval()


def other_library_names(state: dict) -> dict:
    """Every tensor renamed as another library might (`_layers.N.<leaf>`), order and leaf names kept."""
    return {f"_layers.{i}.{k.rpartition('.')[2]}": v for i, (k, v) in enumerate(state.items())}


def test_weights_in_another_naming_load_by_order_and_say_so(tmp_path, capsys):
    original = source_model("test_efficientnet")
    state = other_library_names(original.state_dict())
    torch.save(state, tmp_path / "other.pth")
    loaded = load("test_efficientnet", tmp_path / "other.pth")
    batch = images(size=64)["pixel_values"]
    assert torch.equal(loaded.body.forward_features(batch), original.forward_features(batch))
    err = capsys.readouterr().err
    count = sum(not k.endswith("num_batches_tracked") for k in original.state_dict()) - 2  # minus the classifier
    assert f"mapped {count} tensors by order" in err and "7-class classifier kept as the source head" in err
    source_head = loaded.source_head()
    assert torch.equal(source_head.weight, original.classifier.weight)
    assert torch.allclose(source_head(loaded.features({"pixel_values": batch})), original(batch), atol=1e-6)


def test_files_without_batchnorm_counters_load(tmp_path):
    original = source_model("test_efficientnet")
    state = {k: v for k, v in other_library_names(original.state_dict()).items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "other.pth")
    batch = images(size=64)["pixel_values"]
    assert torch.equal(load("test_efficientnet", tmp_path / "other.pth").body.forward_features(batch),
                       original.forward_features(batch))


@pytest.mark.parametrize("damage", ["swap", "leaf", "drop", "extra"])
def test_anything_but_a_full_match_is_one_line_naming_where_it_parts(tmp_path, damage):
    state = other_library_names(source_model("test_efficientnet").state_dict())
    keys = list(state)
    if damage == "swap":  # two tensors of different shapes change places
        state = {k: state[k] for k in [keys[1], keys[0], *keys[2:]]}
    elif damage == "leaf":  # a running mean saved under another leaf name (same shape)
        state = {(k.replace("running_mean", "mean_running") if i == 3 else k): v for i, (k, v) in enumerate(state.items())}
    elif damage == "drop":
        del state[keys[10]]
    else:
        state["_extra.weight"] = torch.zeros(2, 2, 2)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(TransferCliError) as excinfo:
        load("test_efficientnet", tmp_path / "bad.pth")
    message = one_line_error(excinfo)
    assert "does not fit test_efficientnet: by name 0 of its" in message and "check backbone.name" in message
    agreed = int(re.search(r"by order (?:the first|all) (\d+) agree", message).group(1))
    tensors_before_damage = {"swap": 0, "leaf": 3, "drop": 9}  # BatchNorm counters are not counted
    assert agreed == tensors_before_damage.get(damage, agreed)
    if damage == "extra":
        assert "the file has 3 more (_layers.86.weight, _layers.87.bias, _extra.weight)" in message  # classifier + extra


def facebook_convnext_names(state: dict) -> dict:
    """timm's ConvNeXt names -> those of Facebook's original repository (what its checkpoints use)."""
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.", "downsample_layers.0.", key)
        key = re.sub(r"stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.", r"stages.\1.", key)
        key = key.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("head.norm.", "norm.").replace("head.fc.", "head.")
        renamed[key] = value
    return renamed


def test_original_convnext_checkpoints_load_through_timms_converter(tmp_path, capsys):
    original = source_model("test_convnext")
    state = facebook_convnext_names(original.state_dict())
    assert "downsample_layers.1.1.weight" in state and "stages.1.0.dwconv.weight" in state and "head.weight" in state
    torch.save({"model": state}, tmp_path / "convnext_fb.pth")
    loaded = load("test_convnext", tmp_path / "convnext_fb.pth")
    assert "fitted to test_convnext's names and sizes by timm's checkpoint_filter_fn" in capsys.readouterr().err
    batch = images(size=64)["pixel_values"]
    assert torch.allclose(loaded.source_head()(loaded.features({"pixel_values": batch})), original(batch), atol=1e-5)


def test_hub_weights_keep_their_classifier_as_the_source_head(tmp_path, monkeypatch):
    """timm's pretrained=true path (here served from a local file, as the hub's download would be)."""
    original = source_model("test_resnet")
    torch.save(original.state_dict(), tmp_path / "hub.pth")
    create = timm.create_model

    def from_local_hub(name, pretrained=False, **kwargs):
        overlay = {"pretrained_cfg_overlay": {"file": str(tmp_path / "hub.pth"), "num_classes": 7}} if pretrained else {}
        return create(name, pretrained=pretrained, **overlay, **kwargs)

    monkeypatch.setattr(timm_backbone.timm, "create_model", from_local_hub)
    model = build_backbone(backbone_cfg("timm", name="test_resnet", pretrained=True), NUM_CLASSES).eval()
    batch = images(size=64)["pixel_values"]
    assert model.head.out_features == NUM_CLASSES
    assert torch.allclose(model.source_head()(model.features({"pixel_values": batch})), original(batch), atol=1e-6)
    assert build_backbone(backbone_cfg("timm", name="test_resnet"), NUM_CLASSES).source_head() is None


def test_a_fixed_size_vit_is_built_for_the_image_size_and_its_weights_resampled(tmp_path, capsys):
    original = source_model("test_vit3")  # position embeddings for 160 px
    torch.save(original.state_dict(), tmp_path / "vit160.pth")
    model = build_backbone(backbone_cfg("timm", name="test_vit3", weights=str(tmp_path / "vit160.pth"), image_size=64),
                           NUM_CLASSES).eval()
    assert "by timm's checkpoint_filter_fn" in capsys.readouterr().err
    assert model(images(size=64)).shape == (2, NUM_CLASSES)
    assert torch.equal(model.body.blocks[0].attn.qkv.weight, original.blocks[0].attn.qkv.weight)
