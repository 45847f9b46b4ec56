"""Per-example routing between a frozen and a fine-tuned copy of parts of the body (SpotTune, AdaFilter).

The unit that is routed is a *site*: a whole block of `TransferModel.blocks()` (SpotTune; AdaFilter on
transformer layers), or one convolution inside a block together with the BatchNorm that normalises
its output (AdaFilter on CNNs). The site's modules stay where they are and keep their parameter names
(so layer groups, optimizer state by name and export see an ordinary fine-tuned model); they are the
fine-tuned path F̂. A frozen deep copy F of the same modules (pretrained weights, no gradient,
BatchNorm always in eval mode) runs beside it on the same input, and hooks replace the site's output
with g ⊙ F̂(x) + (1 − g) ⊙ F(x). A convolution's site ends after its BatchNorm, so each path is
normalised by its own BatchNorm before the mix: AdaFilter's gated batch normalisation. In timm and
Hugging Face blocks the shortcut is inside the block, so mixing whole-block outputs is exactly the
routed residual network. g comes from a `Decider`: one value per example (SpotTune) or one per output
channel / hidden unit (AdaFilter).

Everything lives in `model.routing`, a submodule of the model: it moves with the model, its
parameters are named (optimizer state is carried by name) and it is in `state_dict`, so `last.pt`
resumes it and `best.pt` restores the trained decision network for `transfer-cli eval`.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

import torch
from torch import nn

from transfer_cli.backbones.hf_backbone import pool
from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError

#: Backbone families whose blocks this module routes (named in the error for the others).
ROUTABLE = "timm ResNet-family CNNs and ViTs (backbone=timm, quickstart) and Hugging Face BERT-like encoders " \
           "(backbone=hf, minilm)"


@dataclasses.dataclass(frozen=True)
class Site:
    """One routed part of the body: `modules` run in order (entry first, exit last) inside `block`.

    `in_channels` / `out_channels`: channels (hidden units) of the entry's input and of the exit's
    output; `input_shape`: the entry's input without the batch dimension, as seen in the dry run.
    """

    block: str
    modules: tuple[str, ...]
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]


class Decider(nn.Module):
    """Gives the mixing gate of each site; subclasses are SpotTune's policy and AdaFilter's gate network."""

    def begin(self, batch: Batch) -> None:
        """Called once per forward pass, before the body runs."""

    def gate(self, index: int, site_input: torch.Tensor) -> torch.Tensor:
        """(batch,) or (batch, channels) values in {0, 1} (straight-through) for site `index`."""
        raise NotImplementedError


class FrozenPath(nn.ModuleList):
    """Deep copies of one site's modules, chained: no gradient, BatchNorm statistics and dropout always off.

    A convolution followed by its BatchNorm runs as one convolution with the BatchNorm's per-channel
    affine map (eval mode: fixed statistics) folded into the filters: the same function, without a
    normalisation pass over the activations forward and backward. The modules keep their own state.
    """

    def __init__(self, modules: list[nn.Module]):
        super().__init__(copy.deepcopy(m) for m in modules)
        self.requires_grad_(False)
        self.train(False)
        self.folded = len(self) == 2 and isinstance(self[0], nn.Conv2d) and isinstance(self[1], nn.BatchNorm2d) \
            and self[1].track_running_stats

    def train(self, mode: bool = True) -> "FrozenPath":
        return super().train(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.folded:
            return conv_with_folded_norm(self[0], self[1], args[0])
        output = self[0](*args, **kwargs)
        for module in self[1:]:
            output = module(output)
        return output


def conv_with_folded_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """norm(conv(x)) for an eval-mode BatchNorm, as one convolution: filter c scaled by γ_c/√(σ²_c + ε),
    bias β_c − μ_c·γ_c/√(σ²_c + ε) (plus the convolution's own bias, scaled)."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    bias = -norm.running_mean * scale
    if norm.bias is not None:
        bias = bias + norm.bias
    if conv.bias is not None:
        bias = bias + conv.bias * scale
    return conv._conv_forward(x, conv.weight * scale.view(-1, 1, 1, 1), bias)


class Routing(nn.Module):
    """The frozen copies and the decision network of a routed model, plus the hooks that mix.

    `force` (0 or 1) overrides every gate: the tests' "all frozen" / "all fine-tuned" network.
    `fractions()` gives, per block, the mean gate over the training examples seen since the last
    call: the fraction of examples (SpotTune) or filters / units (AdaFilter) that took the fine-tuned path.
    """

    def __init__(self, model: TransferModel, sites: list[Site], decider: Decider):
        super().__init__()
        self.sites = sites
        self.block_names = list(dict.fromkeys(site.block for site in sites))
        self.frozen = nn.ModuleList(FrozenPath([model.get_submodule(n) for n in site.modules]) for site in sites)
        self.decider = decider
        self.force: Optional[float] = None
        self._inputs: dict[int, tuple[tuple, dict]] = {}
        self.register_buffer("_sums", torch.zeros(len(self.block_names)), persistent=False)
        self.register_buffer("_counts", torch.zeros(len(self.block_names)), persistent=False)
        for index, site in enumerate(sites):
            model.get_submodule(site.modules[0]).register_forward_pre_hook(self._stash(index), with_kwargs=True)
            model.get_submodule(site.modules[-1]).register_forward_hook(
                self._mixer(index, self.block_names.index(site.block)))

    def _stash(self, index: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._inputs[index] = (args, kwargs)

        return hook

    def _mixer(self, index: int, block: int):
        def hook(module: nn.Module, _args: tuple, output: Any) -> Any:
            args, kwargs = self._inputs.pop(index)
            tuned = output[0] if isinstance(output, tuple) else output
            frozen = self.frozen[index](*args, **kwargs)
            frozen = frozen[0] if isinstance(frozen, tuple) else frozen
            if self.force is not None:
                g = torch.full(tuned.shape[:1], float(self.force), device=tuned.device)
            else:
                g = self.decider.gate(index, args[0])
            if module.training:
                self._sums[block] += g.detach().float().sum()
                self._counts[block] += g.numel()
            g = expand(g, tuned)
            mixed = torch.lerp(frozen, tuned, g)  # g·tuned + (1 − g)·frozen in one op; exact at g = 0 and 1
            return (mixed, *output[1:]) if isinstance(output, tuple) else mixed

        return hook

    def fractions(self) -> dict[str, float]:
        values, counts = (self._sums / self._counts.clamp(min=1)).tolist(), self._counts.tolist()
        self._sums.zero_()
        self._counts.zero_()
        return {f"finetuned/{name}": v for name, v, n in zip(self.block_names, values, counts) if n}


def channel_axis(x: torch.Tensor) -> int:
    """Where the channels / hidden units are: (B, C, H, W) feature maps, (B, tokens, C) sequences."""
    return 1 if x.dim() == 4 else -1


def expand(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape a (B,) or (B, C) gate to broadcast over a site's output."""
    if g.dim() == 1:
        return g.reshape(-1, *[1] * (like.dim() - 1)).to(like.dtype)
    return (g[:, :, None, None] if like.dim() == 4 else g[:, None, :]).to(like.dtype)


def pooled(x: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Global average of a site's input: over space for feature maps, over real tokens for sequences."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    usable = attention_mask is not None and attention_mask.shape == x.shape[:2]
    return pool(x, attention_mask if usable else None, "mean")


def plan_sites(model: TransferModel, per_filter: bool) -> list[Site]:
    """The sites of a model, in the order they run, from one dry forward in eval mode.

    Without `per_filter` every block is a site. With it, a block holding convolutions gives one site
    per convolution (with the BatchNorm that its output feeds, found by following the tensors in the
    dry run), and a block without convolutions (a transformer layer) stays one site. Raises the
    user-facing error when the model has no blocks or a block's input/output is not a (B, C, H, W)
    or (B, tokens, C) tensor.
    """
    blocks = model.blocks()
    if not blocks:
        raise TransferCliError(f"this backbone lists no routable blocks; per-example routing supports {ROUTABLE}")
    seen: dict[str, Site] = {}
    ran: list[str] = []  # the convolutions in the order they ran
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id of a convolution's output -> (its name, the output)

    def block_recorder(name):
        def hook(_block, args, _kwargs, output):
            out = output[0] if isinstance(output, tuple) else output
            x = args[0] if args else None
            if not (torch.is_tensor(x) and torch.is_tensor(out) and x.dim() == out.dim() and x.dim() in (3, 4)):
                raise TransferCliError(f"block {name} does not map a feature map or token sequence to one; "
                                       f"per-example routing supports {ROUTABLE}")
            seen[name] = Site(name, (name,), x.shape[channel_axis(x)], out.shape[channel_axis(out)],
                              tuple(x.shape[1:]))
        return hook

    def conv_recorder(block, name):
        def hook(conv, args, output):
            ran.append(name)
            produced[id(output)] = (name, output)
            seen[name] = Site(block, (name,), conv.in_channels, conv.out_channels,
                              tuple(args[0].shape[1:]))
        return hook

    def norm_recorder(name):
        def hook(_norm, args):
            if id(args[0]) in produced:
                conv = produced[id(args[0])][0]
                seen[conv] = dataclasses.replace(seen[conv], modules=(conv, name))
        return hook

    handles = [block.register_forward_hook(block_recorder(name), with_kwargs=True) for name, block in blocks]
    for name, block in blocks:
        for sub, module in block.named_modules() if per_filter else ():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(conv_recorder(name, f"{name}.{sub}")))
            elif isinstance(module, nn.BatchNorm2d):
                handles.append(module.register_forward_pre_hook(norm_recorder(f"{name}.{sub}")))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(dummy_batch(model))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    sites = []
    for name, _ in blocks:
        inside = [seen[conv] for conv in ran if seen[conv].block == name]
        sites.extend(inside or [seen[name]])
    return sites


def dummy_batch(model: TransferModel) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    if model.modality == "image":
        return {"pixel_values": torch.zeros(1, *model.preprocessing["input_size"], device=device)}
    ids = torch.ones(1, 2, dtype=torch.long, device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
