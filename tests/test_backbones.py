"""Backbones: layer groups, blocks, feature maps, freezing, weights files and export, on tiny models."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from omegaconf import OmegaConf
from timm.models.resnet import BasicBlock, Bottleneck

from transfer_cli.backbones import BACKBONES, build_backbone
from transfer_cli.backbones.export import export_body
from transfer_cli.errors import TransferCliError

CONFIGS = Path(__file__).resolve().parents[1] / "transfer_cli" / "configs" / "backbone"
NUM_CLASSES = 5


def backbone_cfg(kind: str, **overrides):
    """The shipped config file for `kind` with overrides: the builders read exactly these keys."""
    return OmegaConf.merge(OmegaConf.load(CONFIGS / f"{kind}.yaml"), overrides)


def resnet(**overrides):
    return build_backbone(backbone_cfg("timm", name="test_resnet", **overrides), NUM_CLASSES, pretrained=True)


def images(n=2, size=64, seed=0):
    return {"pixel_values": torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))}


def assert_groups_partition_parameters(model):
    grouped = [n for g in model.groups() for n in g.parameter_names]
    assert sorted(grouped) == sorted(n for n, _ in model.named_parameters())
    assert len(grouped) == len(set(grouped))


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ---- timm: groups, blocks, forward ----------------------------------------------------------
def test_resnet_groups_are_stem_stages_head_and_cover_every_parameter():
    model = resnet()
    assert model.group_names() == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert_groups_partition_parameters(model)
    assert model.group("stem").parameter_names[0] == "body.conv1.0.weight"
    assert model.group("head").parameter_names == ("head.weight", "head.bias")


def test_resnet_blocks_are_the_residual_blocks():
    model = resnet()
    assert [name for name, _ in model.blocks()] == [f"body.layer{i}.0" for i in range(1, 5)]
    assert all(isinstance(block, (BasicBlock, Bottleneck)) for _, block in model.blocks())


def test_vit_groups_own_bare_parameters_and_cover_every_parameter():
    model = build_backbone(backbone_cfg("timm", name="test_vit"), NUM_CLASSES)
    names = model.group_names()
    assert names == ["stem", *[f"blocks.{i}" for i in range(6)], "norm", "head"]
    assert_groups_partition_parameters(model)
    assert {"body.cls_token", "body.pos_embed"} <= set(model.group("stem").parameter_names)
    assert [name for name, _ in model.blocks()] == [f"body.blocks.{i}" for i in range(6)]

    model.set_trainable("stem", False)
    assert not model.body.cls_token.requires_grad and not model.body.pos_embed.requires_grad
    assert model.body.blocks[0].attn.qkv.weight.requires_grad


def test_forward_and_feature_maps_shapes():
    model = resnet().eval()
    batch = images(size=64)
    assert model(batch).shape == (2, NUM_CLASSES)
    assert model.features(batch).shape == (2, model.feature_dim) == (2, 96)
    maps = model.feature_maps(batch, model.group_names())
    # the stem's output is taken after its max-pool: 64 / 4
    assert {n: tuple(t.shape) for n, t in maps.items()} == {
        "stem": (2, 32, 16, 16), "layer1": (2, 32, 16, 16), "layer2": (2, 48, 8, 8),
        "layer3": (2, 192, 4, 4), "layer4": (2, 96, 2, 2), "head": (2, NUM_CLASSES),
    }


def test_vit_stem_output_includes_the_class_token():
    model = build_backbone(backbone_cfg("timm", name="test_vit"), NUM_CLASSES).eval()
    side = model.preprocessing["input_size"][1]
    maps = model.feature_maps(images(size=side), ["stem", "blocks.5", "head"])
    tokens = (side // 16) ** 2 + 1
    assert maps["stem"].shape == maps["blocks.5"].shape == (2, tokens, 64)
    assert maps["head"].shape == (2, NUM_CLASSES)


def test_frozen_group_keeps_batchnorm_in_eval_mode_and_its_statistics():
    model = resnet()
    model.set_trainable("layer1", False)
    assert not any(p.requires_grad for p in model.body.layer1.parameters())
    assert all(p.requires_grad for p in model.body.layer2.parameters())
    assert model.trainable_group_names() == ["stem", "layer2", "layer3", "layer4", "head"]

    model.train()
    frozen_bn, live_bn = model.body.layer1[0].bn1, model.body.layer2[0].bn1
    assert not frozen_bn.training and live_bn.training
    frozen_before, live_before = frozen_bn.running_mean.clone(), live_bn.running_mean.clone()
    model(images())
    assert torch.equal(frozen_bn.running_mean, frozen_before)
    assert not torch.equal(live_bn.running_mean, live_before)


# ---- timm: data config ----------------------------------------------------------------------
def test_preprocessing_comes_from_timm_and_image_size_overrides_it():
    model = resnet()
    own = model.body.pretrained_cfg  # test_resnet's: 160 px, mean/std 0.5, bilinear
    assert model.preprocessing == {key: own[key] for key in ("input_size", "mean", "std", "interpolation", "crop_pct")}
    assert model.preprocessing["input_size"] == (3, 160, 160) and model.preprocessing["mean"] == (0.5, 0.5, 0.5)
    assert resnet(image_size=32).preprocessing["input_size"] == (3, 32, 32)


# ---- timm: weights files and export ---------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 'pretrained' test_resnet with trained-looking BN statistics, exported with its preprocessing."""
    torch.manual_seed(0)
    model = resnet(image_size=48)
    model.train()
    with torch.no_grad():
        model(images(n=4, size=48, seed=1))  # move BN running stats away from their init
    path = tmp_path_factory.mktemp("export") / "source.safetensors"
    export_body(model.eval(), path, {"dataset": "toy", "epochs": 3})
    return model, path


def test_export_then_load_reproduces_features_and_preprocessing(source):
    original, path = source
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert "conv1.0.weight" in f.keys() and not any(k.startswith(("body.", "head.")) for k in f.keys())
    assert metadata["architecture"] == "test_resnet" and metadata["dataset"] == "toy" and metadata["epochs"] == "3"

    loaded = resnet(weights=str(path)).eval()
    assert loaded.preprocessing == original.preprocessing
    assert loaded.preprocessing["input_size"] == (3, 48, 48)
    batch = images(size=48)
    assert torch.equal(loaded.features(batch), original.features(batch))


@pytest.mark.parametrize("layout", ["raw", "state_dict", "checkpoint"])
def test_pth_weights_load_with_or_without_a_wrapper(source, tmp_path, layout):
    original, _ = source
    body_state = {**original.body.state_dict(), "fc.weight": torch.zeros(10, 96), "fc.bias": torch.zeros(10)}
    saved = {
        "raw": body_state,
        "state_dict": {"state_dict": body_state, "epoch": 3},
        "checkpoint": {"model": original.state_dict(), "epoch": 3},  # a transfer-cli best.pt
    }[layout]
    torch.save(saved, tmp_path / "weights.pth")
    loaded = resnet(weights=str(tmp_path / "weights.pth")).eval()
    batch = images()
    assert torch.equal(loaded.features(batch), original.features(batch))


def test_scratch_ignores_weights_but_keeps_their_preprocessing(source):
    original, path = source
    scratch = build_backbone(backbone_cfg("timm", name="test_resnet", weights=str(path)), NUM_CLASSES, pretrained=False)
    assert not torch.equal(scratch.body.conv1[0].weight, original.body.conv1[0].weight)
    batch = images(size=48)
    assert not torch.allclose(scratch.eval().features(batch), original.features(batch))
    assert scratch.preprocessing == original.preprocessing


def test_missing_weights_file_is_a_one_line_error(tmp_path):
    with pytest.raises(TransferCliError) as excinfo:
        resnet(weights=str(tmp_path / "nope.safetensors"))
    assert "not found" in one_line_error(excinfo)


def test_mismatched_keys_are_a_one_line_error_naming_them(source, tmp_path):
    original, _ = source
    state = original.body.state_dict()
    state["extra.weight"] = state.pop("layer4.0.conv2.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(TransferCliError) as excinfo:
        resnet(weights=str(tmp_path / "bad.pth"))
    message = one_line_error(excinfo)
    assert "missing layer4.0.conv2.weight" in message and "unexpected extra.weight" in message


def test_weights_of_another_architecture_are_refused(source):
    _, path = source
    with pytest.raises(TransferCliError) as excinfo:
        build_backbone(backbone_cfg("timm", name="test_efficientnet", weights=str(path)), NUM_CLASSES)
    assert "backbone.name=test_resnet" in one_line_error(excinfo)


def test_unknown_model_name_suggests_how_to_list_names():
    with pytest.raises(TransferCliError) as excinfo:
        build_backbone(backbone_cfg("timm", name="test_resnett"), NUM_CLASSES)
    message = one_line_error(excinfo)
    assert "test_resnet" in message and "timm.list_models" in message


def test_registry_lists_every_kind_with_a_summary():
    assert BACKBONES.names() == ["efficientnet_lite0", "hf", "minilm", "timm"]
    assert all(BACKBONES.summary(kind) for kind in BACKBONES.names())
    with pytest.raises(TransferCliError):
        build_backbone(OmegaConf.create({"kind": "keras"}), NUM_CLASSES)


# ---- Hugging Face ---------------------------------------------------------------------------
def bert(folder, pretrained=True, **overrides):
    return build_backbone(backbone_cfg("hf", weights=str(folder), **overrides), NUM_CLASSES, pretrained=pretrained)


def tokenize(model, texts):
    return dict(model.preprocessing["tokenizer"](texts, padding=True, return_tensors="pt"))


def test_hf_groups_blocks_and_no_pooler(tiny_bert):
    model = bert(tiny_bert)
    assert model.modality == "text" and model.feature_dim == 32
    assert model.group_names() == ["embeddings", "layer.0", "layer.1", "head"]
    assert_groups_partition_parameters(model)
    assert [name for name, _ in model.blocks()] == ["body.encoder.layer.0", "body.encoder.layer.1"]
    assert not any("pooler" in name for name, _ in model.named_parameters())
    maps = model.eval().feature_maps(tokenize(model, ["the cat sat"]), ["embeddings", "layer.1"])
    assert maps["embeddings"].shape == maps["layer.1"].shape == (1, 5, 32)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_pooling_shapes(tiny_bert, pooling):
    model = bert(tiny_bert, pooling=pooling).eval()
    batch = tokenize(model, ["the cat sat on the mat", "a dog ran"])
    assert "token_type_ids" in batch
    assert model.features(batch).shape == (2, 32)
    assert model(batch).shape == (2, NUM_CLASSES)


def test_mean_pooling_ignores_padding(tiny_bert):
    model = bert(tiny_bert, pooling="mean").eval()
    batch = tokenize(model, ["the cat sat on the mat", "a dog ran"])
    assert batch["attention_mask"][1, -1] == 0
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][1, -1] = 7
    with torch.no_grad():
        assert torch.allclose(model.features(batch), model.features(changed), atol=1e-6)
        # and the padded example pools the same as on its own, unpadded
        alone = model.features(tokenize(model, ["a dog ran"]))
        assert torch.allclose(model.features(batch)[1], alone[0], atol=1e-5)


def test_hf_scratch_and_export_roundtrip(tiny_bert, tmp_path):
    model = bert(tiny_bert).eval()
    batch = tokenize(model, ["the cat sat", "a dog ran fast"])
    scratch = bert(tiny_bert, pretrained=False).eval()
    assert not torch.allclose(scratch.features(batch), model.features(batch))

    exported = export_body(model, tmp_path / "exported", {"dataset": "toy"})
    export_body(model, exported, {"dataset": "toy"})  # overwriting an existing export works too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    again = bert(exported).eval()
    assert torch.equal(again.features(batch), model.features(batch))


def test_hf_folder_without_config_is_a_one_line_error(tmp_path):
    with pytest.raises(TransferCliError) as excinfo:
        bert(tmp_path)
    assert "config.json" in one_line_error(excinfo)


def test_hf_weights_missing_from_the_folder_are_an_error_not_random_init(tiny_bert, tmp_path):
    folder = Path(shutil.copytree(tiny_bert, tmp_path / "broken"))
    weights = safetensors.torch.load_file(str(folder / "model.safetensors"))
    key = next(k for k in weights if k.endswith("layer.1.output.dense.weight"))
    del weights[key]
    safetensors.torch.save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(TransferCliError) as excinfo:
        bert(folder)
    assert "layer.1.output.dense.weight" in one_line_error(excinfo)


def test_minilm_loads_offline_with_six_layers():
    model = build_backbone(backbone_cfg("minilm"), NUM_CLASSES).eval()
    assert model.group_names() == ["embeddings", *[f"layer.{i}" for i in range(6)], "head"]
    assert len(model.blocks()) == 6
    batch = tokenize(model, ["transfer learning works", "hello"])
    with torch.no_grad():
        assert model.features(batch).shape == (2, 384)
        assert model(batch).shape == (2, NUM_CLASSES)
