"""Structural pruning of BERT-like encoders: attention heads and FFN (intermediate) units, exactly.

The counterpart of `cnn` (convolution channels) for `modality == "text"` models, with the same
functions so TransTailor runs either. Each encoder layer has two groups: its attention heads (α scales
each head's slice of the context vector on its way into the attention output dense) and its FFN units
(α scales each intermediate activation on its way into the output dense). Both α act on the input
columns of a linear layer, so folding α into that layer's weight columns is exact, and a unit whose α
is 0 contributes nothing: removing it (rows of query/key/value or of the intermediate dense, columns
of the dense that reads them) changes no output. Transformers 5 no longer ships `prune_heads`, so
heads are removed here with its `prune_linear_layer`, narrowing the attention's head count.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.pruning import cnn
from transfer_cli.strategies.pruning.cnn import HistoryEntry

#: FLOPs are counted for one sequence of this many tokens (the run's data.max_length is not known here)
FLOP_TOKENS = 128


@dataclass(frozen=True)
class UnitGroup:
    """The heads (`width` = head size) or FFN units (`width` = 1) of one layer; `reader` is the linear
    layer whose input columns carry them (where α acts and is folded)."""

    name: str
    reader: nn.Linear
    size: int
    width: int


@dataclass
class UnitGraph:
    """The removals done so far, in order (the replayable pruning history)."""

    history: list[HistoryEntry] = field(default_factory=list)


def _layers(model: TransferModel) -> dict[str, nn.Module]:
    """The encoder layers by name, checked to have BERT's attention/intermediate/output layout."""
    layers = dict(model.blocks())
    for name, layer in layers.items():
        try:
            attention = layer.attention
            parts = (attention.self.query, attention.self.key, attention.self.value, attention.output.dense,
                     layer.intermediate.dense, layer.output.dense)
        except AttributeError:
            parts = ()
        if not all(isinstance(p, nn.Linear) for p in parts) or not parts:
            raise TransferCliError(
                f"transtailor prunes heads and FFN units of BERT-like encoders (attention.self.query/key/value, "
                f"attention.output.dense, intermediate.dense, output.dense); {name} ({type(layer).__name__}) "
                "has another layout"
            )
    return layers


def dependency_graph(model: TransferModel) -> UnitGraph:
    _layers(model)
    return UnitGraph()


def channel_groups(model: TransferModel, graph: UnitGraph) -> list[UnitGroup]:
    """Two groups per encoder layer: `<layer>.attention` (heads) and `<layer>.intermediate` (FFN units)."""
    groups = []
    for name, layer in _layers(model).items():
        attention = layer.attention.self
        groups.append(UnitGroup(f"{name}.attention", layer.attention.output.dense,
                                attention.query.out_features // attention.attention_head_size,
                                attention.attention_head_size))
        groups.append(UnitGroup(f"{name}.intermediate", layer.output.dense, layer.intermediate.dense.out_features, 1))
    return groups


class ScalingFactors(cnn.ScalingFactors):
    """α per head / FFN unit, multiplying the reader's input columns (a forward pre-hook)."""

    def attach(self, groups: Sequence[UnitGroup]) -> None:
        self.remove()
        self.alpha = {g.name: self.alpha[g.name] if g.name in self.alpha
                      else nn.Parameter(torch.ones(g.size, device=g.reader.weight.device)) for g in groups}
        for g in groups:
            self._handles.append(g.reader.register_forward_pre_hook(self._scale_input(g)))

    def _scale_input(self, group: UnitGroup):
        def hook(_module, inputs):
            return (inputs[0] * self.alpha[group.name].repeat_interleave(group.width),) + tuple(inputs[1:])
        return hook

    def fold(self, groups: Sequence[UnitGroup]) -> None:
        """Multiply α into the reader's weight columns (W·(α∘x) = (W·diag α)·x), then drop the hooks."""
        self.remove()
        with torch.no_grad():
            for g in groups:
                g.reader.weight.mul_(self.alpha[g.name].detach().repeat_interleave(g.width))


def _remove(model: TransferModel, name: str, units: Sequence[int]) -> None:
    """Remove `units` (heads or FFN units) of group `name` from the model."""
    from transformers.pytorch_utils import prune_linear_layer

    layer_name, kind = name.rsplit(".", 1)
    layer = model.get_submodule(layer_name)
    if kind == "attention":
        attention, output = layer.attention.self, layer.attention.output
        width = attention.attention_head_size
        heads = attention.query.out_features // width
        kept = [h for h in range(heads) if h not in set(units)]
        index = torch.tensor([h * width + i for h in kept for i in range(width)], dtype=torch.long)
        for part in ("query", "key", "value"):
            setattr(attention, part, prune_linear_layer(getattr(attention, part), index, dim=0))
        output.dense = prune_linear_layer(output.dense, index, dim=1)
        attention.num_attention_heads = len(kept)
        attention.all_head_size = len(kept) * width
    else:
        size = layer.intermediate.dense.out_features
        index = torch.tensor([u for u in range(size) if u not in set(units)], dtype=torch.long)
        layer.intermediate.dense = prune_linear_layer(layer.intermediate.dense, index, dim=0)
        layer.output.dense = prune_linear_layer(layer.output.dense, index, dim=1)


def remove_channels(model: TransferModel, graph: UnitGraph, plan: dict[str, Sequence[int]]) -> None:
    """Remove the planned heads / FFN units of each group, recording the removal in `graph`."""
    for name, units in plan.items():
        _remove(model, name, units)
        graph.history.append((name, True, [int(u) for u in units]))


def replay(model: TransferModel, history: Sequence[HistoryEntry]) -> None:
    """Give a freshly built model the pruned structure `history` describes (weights are loaded after)."""
    _layers(model)
    for name, _, units in history:
        _remove(model, name, units)


def history_of(graph: UnitGraph) -> list[HistoryEntry]:
    return list(graph.history)


def count_flops(model: TransferModel) -> int:
    """FLOPs of one forward pass on one sequence of FLOP_TOKENS tokens, or the model's maximum length
    if shorter (torch's own flop counter). Checks the layout first: the count is the first step."""
    _layers(model)
    tokens = min(FLOP_TOKENS, int(getattr(model.body.config, "max_position_embeddings", FLOP_TOKENS)))
    device = next(model.parameters()).device
    batch: dict[str, Any] = {"input_ids": torch.zeros(1, tokens, dtype=torch.long, device=device),
                             "attention_mask": torch.ones(1, tokens, dtype=torch.long, device=device)}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
