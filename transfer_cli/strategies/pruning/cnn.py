"""Structural channel pruning: coupled channel groups, one scaling factor per channel, exact removal.

torch-pruning's DependencyGraph finds which layers share a channel (a conv, its BatchNorm, the next
layers' inputs, and every layer tied to them by a residual addition); this module puts one scaling
factor α on each such channel (multiplying the outputs of the group's BatchNorms), folds α into those
BatchNorms, and removes channels group by group. A channel whose α is 0 is exactly zero everywhere
it flows, so removing it changes no output: pruning is exact, and a mask predicts the pruned model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError

if TYPE_CHECKING:  # imported where a graph is built: torch-pruning takes seconds to import, most runs never prune
    import torch_pruning as tp

BatchNorm = nn.modules.batchnorm._BatchNorm

#: One pruning step as torch-pruning records it: (root layer name, output channels?, channel indices).
HistoryEntry = tuple[str, bool, list[int]]


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must go together: `name` is the root layer (the key of its α), `norms` the
    affine BatchNorms whose outputs carry these channels."""

    name: str
    norms: tuple[nn.Module, ...]
    size: int


def example_input(model: TransferModel) -> torch.Tensor:
    """One zero image at the run's input size, on the model's device."""
    if model.modality != "image":
        raise TransferCliError(
            "transtailor prunes image CNNs with BatchNorm (timm ResNets: backbone=timm backbone.name=resnet50, "
            "or backbone=quickstart) and BERT-like text encoders (backbone=hf, minilm); "
            f"this backbone is a {model.modality} model"
        )
    weight = next(model.parameters())
    return torch.zeros(1, *model.preprocessing["input_size"], device=weight.device, dtype=weight.dtype)


def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model({"pixel_values": images})


def dependency_graph(model: TransferModel) -> tp.DependencyGraph:
    """torch-pruning's channel dependency graph of `model`, traced in eval mode (no BatchNorm update).
    It traces autograd's graph: an input that requires grad puts every layer in it, frozen or not."""
    import torch_pruning as tp

    example = example_input(model).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=_forward,
                                                         verbose=False)
    finally:
        model.train(was_training)


def channel_groups(model: TransferModel, graph: tp.DependencyGraph) -> list[ChannelGroup]:
    """The prunable groups: output channels of convs/linears of the body whose outputs pass an affine
    BatchNorm (where α lives). The head's outputs (the classes) are never pruned."""
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for group in graph.get_all_groups(ignored_layers=[model.head], root_module_types=(nn.Conv2d, nn.Linear)):
        root = group[0].dep.target.module
        size = len(group[0].idxs)
        norms = tuple(dict.fromkeys(dep.target.module for dep, _ in group
                                    if isinstance(dep.target.module, BatchNorm)))
        if norms and all(n.affine and n.num_features == size for n in norms):
            groups.append(ChannelGroup(names[root], norms, size))
    if not groups:
        raise TransferCliError(
            "transtailor found no convolution channels followed by BatchNorm in this backbone; "
            "it supports timm CNNs with BatchNorm such as ResNets (backbone.name=resnet50, test_resnet)"
        )
    return groups


class ScalingFactors:
    """α per channel of each group, applied to the group's BatchNorm outputs by forward hooks."""

    def __init__(self, groups: Sequence[ChannelGroup]):
        self.alpha: dict[str, nn.Parameter] = {}
        self._handles: list[Any] = []
        self.attach(groups)

    def attach(self, groups: Sequence[ChannelGroup]) -> None:
        """Hook α onto `groups` (after a removal: the same groups, narrower); a new group starts at α = 1."""
        self.remove()
        self.alpha = {g.name: self.alpha[g.name] if g.name in self.alpha
                      else nn.Parameter(torch.ones_like(g.norms[0].weight.detach())) for g in groups}
        for g in groups:
            for norm in g.norms:
                self._handles.append(norm.register_forward_hook(self._scale(g.name)))

    def _scale(self, name: str):
        def hook(_module, _inputs, output):
            alpha = self.alpha[name]
            return output * alpha.view(1, -1, *([1] * (output.dim() - 2)))
        return hook

    def parameters(self) -> list[nn.Parameter]:
        return list(self.alpha.values())

    def keep(self, name: str, kept: torch.Tensor) -> None:
        """Follow a removal: the group keeps only the channels `kept` (a bool mask)."""
        self.alpha[name] = nn.Parameter(self.alpha[name].detach()[kept].clone())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def fold(self, groups: Sequence[ChannelGroup]) -> None:
        """Multiply α into each BatchNorm's scale and shift (BN(x)·α = BN'(x)), then drop the hooks."""
        self.remove()
        with torch.no_grad():
            for g in groups:
                alpha = self.alpha[g.name].detach()
                for norm in g.norms:
                    norm.weight.mul_(alpha)
                    norm.bias.mul_(alpha)


def taylor_importance(alpha: Mapping[str, torch.Tensor], grad: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TransTailor's filter importance: Θ = |α · ∂L/∂α| (first-order Taylor estimate of the loss change
    when α is set to 0), divided by the ℓ2 norm of Θ over the filter's own layer (group) so that
    layers of different width and scale rank on one global list."""
    importance = {}
    for name, a in alpha.items():
        theta = (a.detach() * grad[name]).abs()
        importance[name] = theta / theta.norm().clamp_min(torch.finfo(theta.dtype).tiny)
    return importance


def least_important(importance: Mapping[str, torch.Tensor], count: int) -> dict[str, list[int]]:
    """The `count` channels with the lowest importance across all groups, by group; every group keeps
    its most important channel (a layer never disappears)."""
    candidates = []
    for order, (name, scores) in enumerate(importance.items()):
        best = int(scores.argmax())
        candidates += [(float(s), order, c, name) for c, s in enumerate(scores.tolist()) if c != best]
    chosen: dict[str, list[int]] = {}
    for _, _, channel, name in sorted(candidates)[:count]:
        chosen.setdefault(name, []).append(channel)
    return {name: sorted(channels) for name, channels in chosen.items()}


def remove_channels(model: TransferModel, graph: tp.DependencyGraph, plan: Mapping[str, Sequence[int]]) -> None:
    """Remove the planned output channels of each group's root, and everything coupled to them."""
    modules = dict(model.named_modules())
    for name, channels in plan.items():
        root = modules[name]
        prune_out = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, prune_out, list(channels)).prune()
    model.feature_dim = model.head.in_features


def replay(model: TransferModel, history: Sequence[HistoryEntry]) -> None:
    """Give a freshly built model the pruned structure `history` describes (weights are loaded after)."""
    graph = dependency_graph(model)
    graph.load_pruning_history([[name, bool(out), [int(i) for i in idxs]] for name, out, idxs in history])
    model.feature_dim = model.head.in_features


def history_of(graph: tp.DependencyGraph) -> list[HistoryEntry]:
    """The removals done through `graph`, as plain lists (safe to save and load with weights_only)."""
    return [(str(name), bool(out), [int(i) for i in idxs]) for name, out, idxs in graph.pruning_history()]


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: TransferModel) -> int:
    """FLOPs of one forward pass on one image at the run's input size (torch's own flop counter)."""
    example = example_input(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _forward(model, example)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
