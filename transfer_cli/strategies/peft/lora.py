"""LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022), through Hugging Face `peft`.

Each target layer with frozen weight W computes W x + (α/r)·B A x, A (r × k) random, B (d × r) zero, so
the model starts as the pretrained one. `peft` wraps Linear and Conv2d layers alike (for a convolution,
A is a k×k convolution to r channels and B a 1×1 one), so a timm ResNet, a timm ViT (its fused
`attn.qkv`) and a BERT-like encoder all take it. The wrapped layer keeps its place, so
`TransferModel.regroup` gives A and B the layer group (and the discriminative rate) of the layer.
`strategy.method` picks peft's LyCORIS relatives for the same layers: `loha` (Hadamard product of two
low-rank products) and `lokr` (Kronecker product), both zero at the start; `use_dora` is DoRA (Liu et
al., ICML 2024: magnitude and direction of W trained apart). All merge: `export` folds the update
into W (`merge_and_unload`) and writes a plain backbone.

Defaults: r = 8, α = 16, as the official RoBERTa-base GLUE scripts (github.com/microsoft/LoRA,
examples/NLU/roberta_base_*.sh: `--lora_r 8 --lora_alpha 16`, W_q and W_v); dropout 0, peft's default.
"""
from __future__ import annotations

import re
from typing import Any

from omegaconf import ListConfig
from torch import nn

from transfer_cli.backbones.registry import first_line
from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.peft.shared import PeftStrategy, plain_copy

METHODS = ("lora", "loha", "lokr")
#: the layer types the three methods all wrap
LAYERS = (nn.Linear, nn.Conv2d)


@STRATEGIES.register("lora")
class LoRA(PeftStrategy):
    """Low-rank updates beside frozen Linear / Conv2d layers (LoRA, DoRA, LoHa, LoKr via peft); merged at export."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        if cfg.method not in METHODS:
            raise TransferCliError(f"strategy.method={cfg.method} is not one of {', '.join(METHODS)}")
        if cfg.use_dora and cfg.method != "lora":
            raise TransferCliError("strategy.use_dora=true is DoRA, a form of LoRA: set strategy.method=lora")

    def adapt(self, model: TransferModel) -> dict[str, str]:
        from peft import inject_adapter_in_model

        config = self.peft_config(target_modules(model, self.cfg.target_modules))
        check_targets(config, model.body, self.cfg.target_modules)
        try:
            inject_adapter_in_model(config, model.body)
        except ValueError as err:  # e.g. a target of a layer type the method does not wrap
            raise TransferCliError(f"strategy=lora: {first_line(err)}") from None
        return {}

    def peft_config(self, targets: Any):
        from peft import LoHaConfig, LoKrConfig, LoraConfig

        cfg = self.cfg
        if cfg.method == "lora":
            return LoraConfig(r=int(cfg.r), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                              target_modules=targets, use_dora=bool(cfg.use_dora))
        tuner = LoHaConfig if cfg.method == "loha" else LoKrConfig
        return tuner(r=int(cfg.r), alpha=float(cfg.alpha), rank_dropout=float(cfg.dropout), target_modules=targets)

    def export_model(self, model: TransferModel) -> TransferModel:
        merged = plain_copy(model)
        merge_and_unload(merged.body)
        return merged


def target_modules(model: TransferModel, setting: Any) -> Any:
    """peft's `target_modules` for the body: the user's regex (str) or name suffixes (list), or with `auto`
    the family's preset: peft's own table for Hugging Face encoders (BERT: query, value, the paper's W_q
    and W_v), a timm ViT's fused `attn.qkv`, else every ungrouped convolution and Linear layer inside the
    blocks (a CNN; a ConvNeXt's MLP)."""
    if isinstance(setting, (list, ListConfig)):
        return [str(s) for s in setting]
    if setting != "auto":
        return str(setting)
    body = model.body
    if model.modality == "text":
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PRESETS

        model_type = getattr(body.config, "model_type", None)
        if model_type not in PRESETS:
            raise TransferCliError(f"no LoRA preset for model_type={model_type}; set strategy.target_modules "
                                   f"(its layers: {layer_names(body)})")
        return list(PRESETS[model_type])
    if any(name.endswith("attn.qkv") and isinstance(m, nn.Linear) for name, m in body.named_modules()):
        return ["attn.qkv"]
    layers = [f"{block}.{name}".removeprefix("body.") for block, module in model.blocks()
              for name, m in module.named_modules() if isinstance(m, LAYERS) and getattr(m, "groups", 1) == 1]
    if not layers:
        raise TransferCliError(f"no LoRA preset for this backbone (no attn.qkv, no layers in blocks); set "
                               f"strategy.target_modules (its layers: {layer_names(body)})")
    return layers


def check_targets(config: Any, body: nn.Module, setting: Any) -> None:
    """One line when the targets match nothing, or a grouped convolution (peft cannot merge those)."""
    from peft.tuners.tuners_utils import check_target_module_exists

    matched = {name: m for name, m in body.named_modules() if name and check_target_module_exists(config, name)}
    if not matched:
        raise TransferCliError(f"strategy.target_modules={setting} matches no module of the backbone; "
                               f"its Linear and Conv2d layers are: {layer_names(body)}")
    grouped = [name for name, m in matched.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    if grouped:
        raise TransferCliError(f"strategy.target_modules matches grouped convolutions ({', '.join(grouped[:3])}), "
                               "which peft cannot merge into the backbone; leave them out")


def layer_names(body: nn.Module) -> str:
    """The body's Linear and Conv2d layers, with layer numbers as * (blocks.*.attn.qkv), in order."""
    names = [re.sub(r"\.\d+(?=\.|$)", ".*", n) for n, m in body.named_modules() if isinstance(m, LAYERS)]
    return ", ".join(dict.fromkeys(names))


def merge_and_unload(body: nn.Module) -> None:
    """Fold every peft layer's update into its base layer and put the base layer back in its place: the plain
    backbone, as peft's `merge_and_unload` does for a PeftModel (the body here is a bare module)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(body.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent), child, module.get_base_layer())
    if hasattr(body, "peft_config"):
        del body.peft_config
