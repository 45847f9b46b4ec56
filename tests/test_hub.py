"""Without a reachable hub, pretrained loading goes to the local cache at once: a cached timm model
loads, a missing one gives its one-line error, and no download is retried."""
import socket

import huggingface_hub
import pytest
import safetensors.torch
import timm
import torch
from omegaconf import OmegaConf

from transfer_cli.backbones import build_backbone, hub
from transfer_cli.errors import TransferCliError


@pytest.fixture
def no_network(monkeypatch):
    """Every host name fails to resolve; returns the list of names looked up."""
    looked_up = []

    def fail(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub.urllib.request, "getproxies", lambda: {})
    hub.hub_unreachable.cache_clear()
    yield looked_up
    hub.hub_unreachable.cache_clear()


def timm_cfg(name):
    return OmegaConf.create({"kind": "timm", "name": name, "pretrained": True, "weights": None,
                             "image_size": None, "drop_rate": 0.0})


def test_a_missing_pretrained_model_fails_at_once_without_retries(no_network, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(TransferCliError, match="offline, pass a local file with backbone.weights"):
        build_backbone(timm_cfg("test_resnet"), num_classes=3)
    assert len(no_network) == 1  # the one check; huggingface_hub tried no connection (and so no retries)
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline mode was only for the download


def test_a_cached_pretrained_model_loads_offline(no_network, monkeypatch, tmp_path):
    """A hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>/model.safetensors),
    the file holding the ImageNet classifier as hub weights do: the body loads it, the classifier is kept apart."""
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False)
    repo = tmp_path / "models--timm--test_resnet.r160_in1k"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    safetensors.torch.save_file(source.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    model = build_backbone(timm_cfg("test_resnet"), num_classes=3)
    loaded = dict(model.body.state_dict())
    body_keys = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert sorted(loaded) == sorted(body_keys)
    assert all(torch.equal(loaded[k], source.state_dict()[k]) for k in body_keys)
    assert torch.equal(model.source_head().weight, source.fc.weight)
    assert len(no_network) == 1


def test_a_proxy_is_trusted_to_reach_the_hub(no_network, monkeypatch):
    monkeypatch.setattr(hub.urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    assert hub.hub_unreachable() is False and no_network == []


def test_a_hugging_face_name_not_in_the_cache_fails_at_once(no_network, monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    cfg = OmegaConf.create({"kind": "hf", "name": "bert-base-uncased", "pretrained": True, "weights": None,
                            "pooling": "cls", "trust_remote_code": False, "drop_rate": 0.0})
    with pytest.raises(TransferCliError, match="offline, point backbone.weights="):
        build_backbone(cfg, num_classes=2)
    assert len(no_network) == 1
