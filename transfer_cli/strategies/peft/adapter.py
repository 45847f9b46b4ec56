"""Bottleneck adapters in transformer layers (Houlsby et al., "Parameter-Efficient Transfer Learning for
NLP", ICML 2019) and residual adapters in CNN blocks (Rebuffi et al., "Learning multiple visual domains
with residual adapters", NeurIPS 2017; the parallel form of their CVPR 2018 follow-up).

Transformer layer: after the attention's output projection and after the feed-forward's output layer
(`strategy.placement=houlsby`; `pfeiffer`: after the feed-forward only, Pfeiffer et al. 2020), before
the residual sum, h ↦ h + W_up·GELU(W_down·h) with a bottleneck of `strategy.bottleneck` units. Found
in every block as the last Linear inside its attention module and the block's last Linear, which is
attn.proj / mlp.fc2 in a timm ViT and attention.output.dense / output.dense in BERT. Houlsby's code
(google-research/adapter-bert) uses GELU, 64 units (also LAMDA-PILOT's ViT adapter, `ffn_num`) and a
near-zero init of both projections; here W_up starts at exactly zero (as AdaptFormer and PILOT), W_down
at PyTorch's default, so the model starts at the pretrained one.

CNN block: a 1×1 convolution in parallel with each k×k convolution (k > 1; same stride and groups,
zero at the start): conv(x) + A(x).

Houlsby also trains the layer norms per task (Rebuffi the BatchNorms per domain). Training them in
place would change the shared body, so `strategy.train_norms=true` gives every norm layer of the body
a task-specific scale and shift after it instead (SSF's ScaleShift, starting at 1 and 0): the same
per-task affine map, the body untouched.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.peft.additions import Added, add_modules, first_output, replace_first
from transfer_cli.strategies.peft.shared import PeftStrategy, not_in_the_backbone
from transfer_cli.strategies.peft.ssf import scale_shifts

PLACEMENTS = ("houlsby", "pfeiffer")
NORMS = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm)
SUPPORTED = "transformer layers (timm ViTs, Hugging Face BERT-like encoders) and CNN blocks with k×k convolutions " \
            "(timm ResNet-family)"


class Bottleneck(Added):
    """h + W_up·GELU(W_down·h) on the output h of the Linear layer `target`."""

    def __init__(self, target: str, width: int, bottleneck: int):
        super().__init__(target)
        self.down = nn.Linear(width, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def attach(self, model: TransferModel) -> None:
        self.keep(model.get_submodule(self.target).register_forward_hook(self.after))

    def after(self, _module: nn.Module, _args: tuple, output: object) -> object:
        h = first_output(output)
        return replace_first(output, h + self.up(self.act(self.down(h))))


class ParallelConv(Added):
    """conv(x) + A(x) for the convolution `target`, A a 1×1 convolution with its stride and groups."""

    def __init__(self, target: str, conv: nn.Conv2d):
        super().__init__(target)
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, 1, stride=conv.stride, groups=conv.groups,
                              bias=False)
        nn.init.zeros_(self.conv.weight)

    def attach(self, model: TransferModel) -> None:
        self.keep(model.get_submodule(self.target).register_forward_hook(self.after))

    def after(self, _module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.conv(args[0])


def keeps_size(conv: nn.Conv2d) -> bool:
    """Whether a k×k convolution pads so that a 1×1 one with the same stride gives the same output size."""
    if conv.padding == "same":
        return True
    return isinstance(conv.padding, tuple) and all(
        2 * p == d * (k - 1) for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size))


def block_adapters(model: TransferModel, placement: str, bottleneck: int) -> list[Added]:
    """The adapters of every block of `TransferModel.blocks()`; one line for a block that has no place for them."""
    if not model.blocks():
        raise TransferCliError(f"strategy=adapter: this backbone lists no blocks; adapters support {SUPPORTED}")
    added: list[Added] = []
    for block_name, block in model.blocks():
        linears = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        attention = [n for n, _ in linears if re.search(r"attn|attention", n)]
        convs = [(n, m) for n, m in block.named_modules()
                 if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1 and keeps_size(m)]
        if attention and linears[-1][0] not in attention:  # a transformer layer: attention, then feed-forward
            names = [attention[-1], linears[-1][0]] if placement == "houlsby" else [linears[-1][0]]
            added += [Bottleneck(f"{block_name}.{n}", block.get_submodule(n).out_features, bottleneck) for n in names]
        elif convs:
            added += [ParallelConv(f"{block_name}.{n}", m) for n, m in convs]
        else:
            raise TransferCliError(f"strategy=adapter: block {block_name} is neither a transformer layer nor a CNN "
                                   f"block with k×k convolutions; adapters support {SUPPORTED}")
    return added


@STRATEGIES.register("adapter")
class Adapters(PeftStrategy):
    """Houlsby bottleneck adapters in transformer layers, Rebuffi residual adapters in CNN blocks; body frozen."""

    export_caveat = not_in_the_backbone("adapters")

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        if cfg.placement not in PLACEMENTS:
            raise TransferCliError(f"strategy.placement={cfg.placement} is not one of {', '.join(PLACEMENTS)}")
        if int(cfg.bottleneck) < 1:
            raise TransferCliError(f"strategy.bottleneck={cfg.bottleneck} must be a positive number of units")

    def adapt(self, model: TransferModel) -> dict[str, str]:
        added = block_adapters(model, str(self.cfg.placement), int(self.cfg.bottleneck))
        if self.cfg.train_norms:
            added += scale_shifts(model, NORMS)
        return add_modules(model, added)
