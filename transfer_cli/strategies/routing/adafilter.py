"""AdaFilter (Guo, Li, Wang & Rosing, "AdaFilter: Adaptive Filter Fine-tuning for Deep Transfer Learning", AAAI 2020).

Every convolution inside the blocks of a CNN exists twice, the frozen pretrained filters F_l and a
fine-tuned copy F̂_l, and for each example each output filter picks one of them:
x_l = G_l ⊙ BN̂_l(F̂_l(x_{l−1})) + (1 − G_l) ⊙ BN_l(F_l(x_{l−1})), G_l ∈ {0, 1}^C (see `routing`).
Gated batch normalisation: the two paths keep separate BatchNorm layers, the frozen path the
pretrained one (its statistics, eval mode), the fine-tuned path a trainable copy, so the channels
each produces are normalised with their own statistics before they are mixed. The gates come from
one recurrent gate network shared by all layers: an LSTM that steps once per convolution, in the
order they run, fed with the globally pooled input of that convolution (the previous layer's
activations); a per-layer linear layer turns its hidden state into C gate logits, binarised at 0.5
in the forward pass with the sigmoid's gradient in the backward pass (straight-through), in training
and evaluation alike, so evaluation is deterministic.

For a transformer layer the unit is a hidden dimension of the layer's output: the whole layer is
routed per hidden unit (its LayerNorms are inside, so each path again normalises with its own).

Sources: no official code for AdaFilter is in the search index we have, so this follows the paper's
description as the spec summarises it, and says where it departs:
- the per-layer input projection (layer input width -> LSTM width) is ours: the LSTM needs one input
  size, the layers' widths differ. LSTM width: `hidden` (config).
- the stem (the convolution before the first block) is not routed: `shared` says whether it trains,
  like SpotTune's first convolution.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.routing.routed import RoutedStrategy
from transfer_cli.strategies.routing.sites import Decider, Site, pooled


def binary_straight_through(probability: torch.Tensor) -> torch.Tensor:
    """1 where probability > 0.5 else 0 in the forward pass; the gradient of `probability` backward."""
    hard = (probability > 0.5).to(probability.dtype)
    return hard + probability - probability.detach()


class GateNetwork(Decider):
    """An LSTM over the routed layers: pooled layer input -> projection -> LSTM step -> per-filter gates."""

    def __init__(self, sites: list[Site], hidden: int):
        super().__init__()
        self.inputs = nn.ModuleList(nn.Linear(site.in_channels, hidden) for site in sites)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.outputs = nn.ModuleList(nn.Linear(hidden, site.out_channels) for site in sites)
        self.state: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.attention_mask: Optional[torch.Tensor] = None

    def begin(self, batch: Batch) -> None:
        self.state = None
        self.attention_mask = batch.get("attention_mask")

    def gate(self, index: int, site_input: torch.Tensor) -> torch.Tensor:
        step = self.inputs[index](pooled(site_input, self.attention_mask).float())
        self.state = self.cell(step, self.state)
        return binary_straight_through(torch.sigmoid(self.outputs[index](self.state[0])))


@STRATEGIES.register("adafilter")
class AdaFilter(RoutedStrategy):
    """Route each filter of each convolution (hidden unit of each transformer layer), per example, through
    the frozen or the fine-tuned copy."""

    per_filter = True

    def decider(self, model: TransferModel, sites: list[Site]) -> Decider:
        return GateNetwork(sites, int(self.cfg.hidden))
