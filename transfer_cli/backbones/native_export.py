"""Exports the user's own tools load whole, trained head included (`transfer-cli export ... format=native`).

timm bodies become a folder in timm's hub layout: model.safetensors (the body in timm's names, the
trained head under the architecture's classifier name) and config.json (architecture, num_classes,
label_names, the preprocessing). `timm.create_model("local-dir:FOLDER", pretrained=True)` reads both;
`timm.create_model(name, pretrained=True, num_classes=N, pretrained_cfg_overlay=dict(file=...,
num_classes=N))` loads the file alone (timm drops a classifier whose size differs from its config's).

Hugging Face bodies become a save_pretrained folder of the *ForSequenceClassification model with
id2label. That head reads the first token through a dense + tanh layer (BERT's pooler, RoBERTa's
classification head) that a transfer-cli head does not have: it is set to tanh(eps * x) with eps =
1e-6, linear to float precision, and the trained head is divided by eps, so the logits are the run's.
Mean pooling has no such head: it is refused.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import safetensors.torch
import torch
from torch import nn

from transfer_cli.backbones.export import replace_folder
from transfer_cli.backbones.hf_backbone import HFModel
from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError

#: the pooler's scale: tanh(eps * x) = eps * x to float32 precision for any feature a network gives
LINEAR_TANH_EPS = 1e-6


def export_native(model: TransferModel, path: Path, class_names: Sequence[str]) -> Path:
    """Write `model` (body and trained head) to the folder `path` in its library's own format."""
    if not isinstance(model.head, nn.Linear):
        raise TransferCliError(f"format=native needs a linear head; this run's head is {type(model.head).__name__}; "
                               "export without format=native")
    with replace_folder(path) as tmp:
        if isinstance(model, HFModel):
            _hf_folder(model, tmp, list(class_names))
        elif hasattr(model.body, "pretrained_cfg"):
            _timm_folder(model, tmp, list(class_names))
        else:
            raise TransferCliError(f"format=native knows timm and Hugging Face bodies, not {type(model).__name__}")
    return path


def _timm_folder(model: TransferModel, folder: Path, class_names: list[str]) -> None:
    classifier = model.body.pretrained_cfg.get("classifier")
    if not isinstance(classifier, str):
        raise TransferCliError("format=native: this timm architecture names no single classifier layer; "
                               "export without format=native")
    state = {**model.body.state_dict(), **{f"{classifier}.{k}": v for k, v in model.head.state_dict().items()}}
    safetensors.torch.save_file({k: v.detach().cpu().clone().contiguous() for k, v in state.items()},
                                str(folder / "model.safetensors"))
    prep = model.preprocessing
    config = {
        "architecture": model.body.pretrained_cfg["architecture"],
        "num_classes": len(class_names),
        "num_features": model.feature_dim,
        "label_names": class_names,
        "pretrained_cfg": {
            "input_size": list(prep["input_size"]), "mean": list(prep["mean"]), "std": list(prep["std"]),
            "interpolation": prep.get("interpolation", "bilinear"), "crop_pct": prep.get("crop_pct", 1.0),
            "classifier": classifier, "num_classes": len(class_names),
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _hf_folder(model: HFModel, folder: Path, class_names: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    if model.pooling != "cls":
        raise TransferCliError("format=native: a Hugging Face classifier reads the first token, but this run "
                               f"pooled by {model.pooling!r}; train with backbone.pooling=cls to export it natively")
    config = model.body.config.__class__.from_dict(model.body.config.to_dict())
    config.num_labels = len(class_names)
    config.id2label = dict(enumerate(class_names))
    config.label2id = {name: i for i, name in enumerate(class_names)}
    full = AutoModelForSequenceClassification.from_config(config)
    loaded = full.base_model.load_state_dict(model.body.state_dict(), strict=False)
    left = [k for k in loaded.missing_keys if not k.startswith("pooler.")] + loaded.unexpected_keys
    if left:
        raise TransferCliError(f"format=native: the body's weights do not fit {type(full).__name__} "
                               f"({', '.join(left[:3])}); export without format=native")
    dense, out = _first_token_head(full)
    weight, bias = model.head.weight.detach(), model.head.bias.detach()
    with torch.no_grad():
        dense.weight.copy_(torch.eye(model.feature_dim) * LINEAR_TANH_EPS)
        dense.bias.zero_()
        out.weight.copy_(weight / LINEAR_TANH_EPS)
        out.bias.copy_(bias)
    full.save_pretrained(folder)
    model.preprocessing["tokenizer"].save_pretrained(folder)


def _first_token_head(full: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The (dense before tanh, final linear) pair of a sequence classifier on the first token."""
    classifier = getattr(full, "classifier", None)
    pooler = getattr(full.base_model, "pooler", None)
    if isinstance(classifier, nn.Linear) and pooler is not None and isinstance(getattr(pooler, "dense", None), nn.Linear):
        return pooler.dense, classifier  # BERT: pooler (dense + tanh on the first token), then the classifier
    if isinstance(getattr(classifier, "dense", None), nn.Linear) and isinstance(getattr(classifier, "out_proj", None), nn.Linear):
        return classifier.dense, classifier.out_proj  # RoBERTa-like: dense + tanh + out_proj on the first token
    raise TransferCliError(f"format=native: {type(full).__name__}'s classification head is not a dense + tanh layer "
                           "on the first token (BERT's, RoBERTa's); export without format=native")
