"""Fit a state dict saved by another library (other tensor names) to the model being built.

Three ways are tried, each of which either accounts for every tensor of the model or is rejected
as a whole, so a load is never partial or silent:

1. by name: the file already uses the model's names (timm's, or a transfer-cli export);
2. the architecture's own converter: timm ships a `checkpoint_filter_fn` beside many models that
   renames the original authors' checkpoints (Facebook's ConvNeXt, Microsoft's Swin, OpenAI CLIP ViTs);
3. by order: both lists, in order, agree tensor by tensor in shape and in leaf name (weight, bias,
   running_mean, ...) -- what `efficientnet_pytorch`'s EfficientNet-Lite0 is to timm's
   `tf_efficientnet_lite0`. Said on stderr, with the count, since no name vouches for it.

The source model's classifier (a trailing weight [classes, features] and its bias) is not part of
the body; it is returned apart, so methods that need the source task's outputs (Co-Tuning, LwF) can
have it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch

from transfer_cli.backbones.registry import few
from transfer_cli.errors import TransferCliError

State = dict[str, torch.Tensor]
#: BatchNorm's step counters: not weights; files from other libraries (or older torch) may lack them
COUNTER = "num_batches_tracked"


@dataclass
class Fitted:
    """A state dict in the model's names, with every tensor of the model, and the source's classifier."""

    body: State
    #: {"weight": [classes, features], "bias": [classes]} of the source model, or {} when the file has none
    classifier: State = field(default_factory=dict)
    #: how the names were matched: "name", "checkpoint_filter_fn" or "order"
    how: str = "name"


def fit_state_dict(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    classifier: Sequence[str],
    feature_dim: int,
    source: str,
    model_name: str,
    convert: Optional[Callable[[State], State]] = None,
) -> Fitted:
    """`state` renamed to the keys of `expected` (the model's own state dict), or a one-line error.

    `classifier` are the module paths of the source classifier in the model's naming (timm's
    pretrained_cfg["classifier"]), absent from `expected`: the first is kept as the source head;
    `feature_dim` is its input width.
    `convert` is the architecture's converter (timm's checkpoint_filter_fn), if it has one.
    """
    state = dict(state)
    fitted, by_name = _by_name(state, expected, classifier)
    if fitted is not None:
        return fitted
    converted = _convert(convert, state)
    if converted is not None:
        fitted, _ = _by_name(converted, expected, classifier)
        if fitted is not None:
            fitted.how = "checkpoint_filter_fn"
            print(f"{source}: fitted to {model_name}'s names and sizes by timm's checkpoint_filter_fn "
                  f"({len(fitted.body)} tensors)", file=sys.stderr)
            return fitted
    fitted, by_order = _by_order(state, expected, feature_dim)
    if fitted is not None:
        head = f", and the file's {tuple(fitted.classifier['weight'].shape)[0]}-class classifier kept as the source head" \
            if fitted.classifier else ""
        print(f"{source}: names differ from {model_name}'s; mapped {_count(expected)} tensors by order, "
              f"every shape and leaf name agreeing{head}", file=sys.stderr)
        return fitted
    converter = "" if convert is None else "; timm's checkpoint_filter_fn for it did not give its names either"
    raise TransferCliError(
        f"{source} does not fit {model_name}: {by_name}; {by_order}{converter}; check backbone.name "
        "matches the model the file was saved from, or rename the file's tensors to timm's names"
    )


def _count(expected: Mapping[str, torch.Tensor]) -> int:
    return sum(not k.endswith(COUNTER) for k in expected)


def _by_name(state: State, expected: Mapping[str, torch.Tensor], classifier: Sequence[str]) -> tuple[Optional[Fitted], str]:
    """The file in the model's own names (the classifier split off), or why not."""
    prefixes = tuple(f"{c}." for c in classifier)
    head = {k[len(prefixes[0]):]: v for k, v in state.items() if k.startswith(prefixes[0])} if prefixes else {}
    rest = {k: v for k, v in state.items() if not (prefixes and k.startswith(prefixes))}
    problems = {
        "missing": [k for k in expected if k not in rest and not k.endswith(COUNTER)],
        "unexpected": [k for k in rest if k not in expected],
        "wrong shape": [k for k in rest if k in expected and rest[k].shape != expected[k].shape],
    }
    if not any(problems.values()):
        return Fitted({**_counters(expected), **rest}, _classifier(head)), ""
    matched = sum(k in rest and rest[k].shape == expected[k].shape for k in expected if not k.endswith(COUNTER))
    found = ", ".join(f"{kind} {few(keys)}" for kind, keys in problems.items() if keys)
    return None, f"by name {matched} of its {_count(expected)} tensors match ({found})"


def _by_order(state: State, expected: Mapping[str, torch.Tensor], feature_dim: int) -> tuple[Optional[Fitted], str]:
    """The file's tensors paired with the model's in order, when every pair agrees; or where they part."""
    source = [(k, v) for k, v in state.items() if not k.endswith(COUNTER)]
    target = [(k, v) for k, v in expected.items() if not k.endswith(COUNTER)]
    agree = 0
    for (name, tensor), (own, mine) in zip(source, target):
        if _leaf(name) != _leaf(own) or tensor.shape != mine.shape:
            break
        agree += 1
    if agree == len(target):
        head = _trailing_classifier(source[agree:], feature_dim)
        if head is not None:
            return Fitted({**_counters(expected), **{own: t for (own, _), (_, t) in zip(target, source)}}, head, "order"), ""
        extra = [name for name, _ in source[agree:]]
        return None, f"by order all {agree} agree but the file has {len(extra)} more ({few(extra)})"
    if agree < min(len(source), len(target)):
        (name, tensor), (own, mine) = source[agree], target[agree]
        where = f"then the file's {name} {tuple(tensor.shape)} meets the model's {own} {tuple(mine.shape)}"
    else:
        where = f"then the file ends ({len(source)} tensors, the model has {len(target)})"
    return None, f"by order the first {agree} agree, {where}"


def _trailing_classifier(rest: list[tuple[str, torch.Tensor]], feature_dim: int) -> Optional[State]:
    """What follows the body in the file: nothing, or a linear classifier reading `feature_dim` features."""
    if not rest:
        return {}
    shapes = [tuple(t.shape) for _, t in rest]
    linear = len(rest) <= 2 and len(shapes[0]) == 2 and shapes[0][1] == feature_dim
    if linear and (len(rest) == 1 or shapes[1] == (shapes[0][0],)):
        return _classifier({_leaf(k): t for k, t in rest})
    return None


def _classifier(head: State) -> State:
    """The source classifier as {"weight", "bias"}; {} unless it is one linear layer."""
    return head if "weight" in head and head["weight"].ndim == 2 and set(head) <= {"weight", "bias"} else {}


def _counters(expected: Mapping[str, torch.Tensor]) -> State:
    """The model's own BatchNorm counters, used where the file lacks them."""
    return {k: v.clone() for k, v in expected.items() if k.endswith(COUNTER)}


def _convert(convert: Optional[Callable[[State], State]], state: State) -> Optional[State]:
    """The converter's output, or None when it has none or fails on a file it was not written for."""
    if convert is None:
        return None
    try:
        converted = convert(dict(state))
    except Exception:  # noqa: BLE001 - a converter for other checkpoints: this file is simply not one of them
        return None
    return dict(converted) if isinstance(converted, Mapping) else None


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]
