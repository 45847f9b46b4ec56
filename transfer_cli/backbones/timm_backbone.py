"""`kind: timm`: any timm image model, grouped by timm's own `group_matcher`.

timm already knows each architecture's stem, stages and blocks (it uses them for layer-wise
learning-rate decay), so reading its matcher makes every timm model work without a table of
module names here.
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path
from typing import Any, Hashable, Mapping, Optional

import safetensors
import safetensors.torch
import timm
import torch
from omegaconf import DictConfig
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg_value, parse_model_name
from timm.models._manipulate import MATCH_PREV_GROUP, group_parameters
from torch import nn

from transfer_cli.backbones import origin
from transfer_cli.backbones.registry import BACKBONES, first_line
from transfer_cli.backbones.hub import cache_only_when_unreachable
from transfer_cli.backbones.model import HEAD, Batch, TransferModel, group_members
from transfer_cli.backbones.state_mapping import fit_state_dict
from transfer_cli.errors import TransferCliError
from transfer_cli.io import DamagedFile, load_torch

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")
#: Sorts after every block like MATCH_PREV_GROUP but starts a group of its own.
OWN_TRAILING_GROUP = (MATCH_PREV_GROUP[0] - 1,)
CONTAINERS = (nn.Sequential, nn.ModuleList)


class TimmModel(TransferModel):
    """A timm body built with num_classes=0: it returns pooled features (after timm's drop_rate)."""

    def features(self, batch: Batch) -> torch.Tensor:
        return self.body(batch["pixel_values"])


@BACKBONES.register("timm")
def build_timm(cfg: DictConfig, num_classes: int, pretrained: bool = True) -> TransferModel:
    """Any timm image model (timm.create_model), pretrained from timm's hub/cache or a local weights file."""
    _check_name(cfg.name)
    weights = _weights_path(cfg.weights)
    body, source_classifier = _create(cfg.name, pretrained and cfg.pretrained and weights is None, float(cfg.drop_rate),
                                      cfg.get("image_size"))
    metadata = _file_metadata(weights)
    architecture = metadata.get("architecture")
    if architecture and architecture != body.pretrained_cfg.get("architecture"):
        raise TransferCliError(
            f"backbone.weights={weights} holds a {architecture!r} model, not {cfg.name!r}; "
            f"set backbone.name={architecture}"
        )
    feature_dim = getattr(body, "head_hidden_size", None) or body.num_features
    if pretrained and weights is not None:
        source_classifier = _load_state(body, _read_state_dict(weights), weights, feature_dim)
    model = TimmModel(
        body=body,
        head=nn.Linear(feature_dim, num_classes),
        group_modules=layer_groups(body),
        block_names=[f"body.{path}" for path in block_paths(body)],
        feature_dim=feature_dim,
        modality="image",
        preprocessing=data_config(body, metadata, cfg.get("image_size")),
        source_classifier=source_classifier,
    )
    if pretrained and weights is not None:
        model.weights_origin = origin.local(weights)
    elif pretrained and cfg.pretrained:
        model.weights_origin = origin.hub(body.pretrained_cfg.get("hf_hub_id") or cfg.name)
    else:
        model.weights_origin = origin.random_init()
    return model


def _check_name(name: str) -> None:
    source, _ = parse_model_name(name)
    if source is None and not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise TransferCliError(
            f"unknown timm model {name!r}; {hint}"
            "list names with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
        )


def _create(name: str, from_hub: bool, drop_rate: float, image_size: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The body without a classifier, and the hub weights' own classifier (kept as the source head).

    A network built for one input size (ViT, Swin, MaxViT: position embeddings, attention windows)
    is built for `image_size` when it is given; timm resamples pretrained position tables to it.
    """
    sized = {"img_size": _height_width(image_size)} if image_size and _fixed_input_size(name) else {}
    try:
        with cache_only_when_unreachable():
            body = timm.create_model(name, pretrained=from_hub, num_classes=None if from_hub else 0,
                                     drop_rate=drop_rate, **sized)
    except OSError as e:  # offline and not in the cache: huggingface_hub's not-found errors are OSErrors
        raise TransferCliError(
            f"cannot fetch pretrained weights for timm model {name!r} ({first_line(e)}); "
            "offline, pass a local file with backbone.weights=<file.safetensors|.pth> or set backbone.pretrained=false"
        ) from None
    if not from_hub:
        return body, {}
    classifier = body.get_classifier()
    kept = {k: v.detach().clone() for k, v in classifier.state_dict().items()} if isinstance(classifier, nn.Linear) else {}
    body.reset_classifier(0)
    return body, kept


def _fixed_input_size(name: str) -> bool:
    try:
        return bool(get_pretrained_cfg_value(name, "fixed_input_size"))
    except RuntimeError:  # an hf-hub: model's config is known only once downloaded
        return False


def _height_width(image_size: Any) -> tuple[int, int]:
    """backbone.image_size: an int, or [height, width]."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    return int(height), int(width)


# ---- weights files ---------------------------------------------------------------------------
def _weights_path(weights: Optional[str]) -> Optional[Path]:
    if not weights:
        return None
    path = Path(str(weights)).expanduser()
    if path.is_dir():
        raise TransferCliError(
            f"backbone.weights={path} is a folder; a timm backbone takes one weights file "
            f"({', '.join(WEIGHT_SUFFIXES)}); a Hugging Face model folder goes with backbone=hf"
        )
    if not path.is_file():
        raise TransferCliError(f"backbone.weights file not found: {path}; give the path of a .safetensors or .pth file")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise TransferCliError(
            f"backbone.weights={path} has an unknown format; use one of {', '.join(WEIGHT_SUFFIXES)}"
        )
    return path


def _file_metadata(path: Optional[Path]) -> dict[str, str]:
    """A safetensors file's metadata (how our exported source models carry architecture and preprocessing)."""
    if path is None or path.suffix != ".safetensors":
        return {}
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (OSError, safetensors.SafetensorError) as e:
        raise TransferCliError(f"cannot read backbone.weights={path}: {first_line(e)}") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors by name from a .safetensors file, or from a .pth state dict (raw, or under "state_dict"/"model")."""
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        state = load_torch(path)
    except DamagedFile as e:  # cut short, or pickled objects that weights-only loading refuses
        raise TransferCliError(f"cannot read backbone.weights={path}: {e.reason}") from None
    except Exception as e:  # a corrupt safetensors file
        raise TransferCliError(f"cannot read backbone.weights={path}: {first_line(e)}") from None
    if isinstance(state, Mapping):
        state = next((state[k] for k in ("state_dict", "model") if isinstance(state.get(k), Mapping)), state)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TransferCliError(f"backbone.weights={path} is not a state dict (a mapping of names to tensors)")
    return _strip_transfer_model_prefix(dict(state))


def _strip_transfer_model_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transfer-cli checkpoint (keys body.* and head.*) gives its body, so best.pt works as weights."""
    if not state or not all(k.startswith(("body.", "head.")) for k in state):
        return state
    return {k[len("body."):]: v for k, v in state.items() if k.startswith("body.")}


def _load_state(body: nn.Module, state: dict[str, torch.Tensor], path: Path, feature_dim: int) -> dict[str, torch.Tensor]:
    """Load every tensor of the body, in timm's names or another library's (see state_mapping), and
    return the source model's classifier, which the target's new head replaces."""
    classifier = body.pretrained_cfg.get("classifier") or ()
    converter = getattr(sys.modules[type(body).__module__], "checkpoint_filter_fn", None)
    fitted = fit_state_dict(
        state, body.state_dict(),
        classifier=[classifier] if isinstance(classifier, str) else list(classifier),
        feature_dim=feature_dim, source=f"backbone.weights={path}",
        model_name=str(body.pretrained_cfg.get("architecture")),
        convert=None if converter is None else lambda s: converter(s, body),
    )
    body.load_state_dict(fitted.body)
    return fitted.classifier


# ---- data config ----------------------------------------------------------------------------
def data_config(body: nn.Module, metadata: Mapping[str, str], image_size: Any = None) -> dict[str, Any]:
    """The backbone's own preprocessing (input_size, mean, std, interpolation, crop_pct), from the
    weights file's metadata when it has one, else from timm's pretrained config for the model.

    `image_size` (an int, or [height, width]) overrides the input size.
    """
    if "pretrained_cfg" in metadata:
        resolved = resolve_data_config(pretrained_cfg=json.loads(metadata["pretrained_cfg"]))
    else:
        resolved = resolve_data_config(model=body)
    config = {
        "input_size": tuple(int(v) for v in resolved["input_size"]),
        "mean": tuple(float(v) for v in resolved["mean"]),
        "std": tuple(float(v) for v in resolved["std"]),
        "interpolation": str(resolved["interpolation"]),
        "crop_pct": float(resolved["crop_pct"]),
    }
    if image_size is not None:
        config["input_size"] = (config["input_size"][0], *_height_width(image_size))
    return config


# ---- groups and blocks ----------------------------------------------------------------------
def layer_groups(body: nn.Module) -> dict[str, list[nn.Module | nn.Parameter]]:
    """timm's coarse groups (stem, stages, ...), named "stem" then by the module paths they cover."""
    members = group_members(body, _group_index(body, coarse=True))
    groups = {}
    for index, group in members.items():
        name = "stem" if index == 0 else "+".join(path for path, member in group if _has_parameters(member))
        groups["body.head" if name == HEAD else name] = [member for _, member in group]
    return groups


def block_paths(body: nn.Module) -> list[str]:
    """The residual / transformer blocks, from timm's fine groups (stem excluded).

    A block is a composite module (several layers with parameters) that sits in a Sequential or
    ModuleList; a group that is a whole stage gives the blocks in its block list (a one-block
    `layer1` gives `layer1.0`). Single layers (a final norm, a downsampling conv) are never blocks.
    """
    members = group_members(body, _group_index(body, coarse=False))
    paths = []
    for index, group in members.items():
        for path, member in group if index != 0 else ():
            if not (isinstance(member, nn.Module) and _has_parameters(member)):
                continue
            path = _unwrap(body, path)
            module = body.get_submodule(path)
            if isinstance(module, CONTAINERS):
                paths += [f"{path}.{name}" for name, child in module.named_children() if _is_composite(child)]
            elif _is_composite(module) and isinstance(body.get_submodule(path.rpartition(".")[0]), CONTAINERS):
                paths.append(path)
    return paths


def _unwrap(body: nn.Module, path: str) -> str:
    """Descend while the module only wraps one child with parameters (a stage holding a single block)."""
    module = body.get_submodule(path)
    while next(module.parameters(recurse=False), None) is None:
        children = [(name, child) for name, child in module.named_children() if _has_parameters(child)]
        if len(children) != 1:
            break
        name, module = children[0]
        path = f"{path}.{name}"
    return path


def _is_composite(module: nn.Module) -> bool:
    return sum(next(m.parameters(recurse=False), None) is not None for m in module.modules()) > 1


def _group_index(body: nn.Module, coarse: bool) -> dict[str, Hashable]:
    """Parameter name -> group number, input to output, from the model's `group_matcher`.

    timm folds trailing layers (a ViT's final norm) into the last block's group, which suits layer
    decay; here they form a group of their own so each group is one stretch of the network.
    """
    matcher = body.group_matcher(coarse=coarse)
    if isinstance(matcher, dict):
        matcher = {
            key: [(regex, OWN_TRAILING_GROUP if suffix == MATCH_PREV_GROUP else suffix) for regex, suffix in spec]
            if isinstance(spec, (list, tuple)) else spec
            for key, spec in matcher.items()
        }
    grouped = group_parameters(body, matcher)
    return {name: index for index, names in grouped.items() for name in names}


def _has_parameters(member: nn.Module | nn.Parameter) -> bool:
    return isinstance(member, nn.Parameter) or next(member.parameters(), None) is not None
