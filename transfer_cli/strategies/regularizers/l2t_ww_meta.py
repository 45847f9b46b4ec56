"""L2T-ww's pieces as functions of tensors: the weighted feature-matching loss, the meta-networks that
say what (channels) and where (layer pairs) to transfer, and the meta-gradient through look-ahead steps.

The meta-gradient: from the weights θ after the real step, T steps of SGD on the matching loss alone
and one on the cross-entropy are taken functionally (the model's own weights, buffers and optimizer
state are never touched), each differentiable in the meta-networks' parameters φ; the cross-entropy
after them is differentiated with respect to φ by autograd through all the steps. This is the official
code's quantity (`train/meta_optimizers.py: MetaSGD.meta_backward` computes it by a hand-written
reverse recursion over the recorded steps, momentum and weight decay included); here autograd does
the recursion, and nothing has to be rolled back, since the real weights never moved.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.strategies.regularizers.terms import channels_first

Pair = tuple[str, str]  # (source layer, target layer)


def pooled(feature_map: torch.Tensor) -> torch.Tensor:
    """Global average over positions: (B, C, H, W) or (B, T, D) -> (B, channels)."""
    return channels_first(feature_map).mean(dim=2)


def pair_errors(source: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """e_c = mean over positions of (S(x) − r(T(x)))², per example and source channel: (B, C_s).

    r is the 1×1 regressor (weight (C_s, C_t), bias (C_s,)); a source map of another spatial size is
    resized (bilinear) to the target's, as the official FeatureMatching does."""
    if source.dim() == 4 and source.shape[-2:] != target.shape[-2:]:
        source = F.interpolate(source, size=target.shape[-2:], mode="bilinear", align_corners=False)
    regressed = torch.einsum("oc,bcp->bop", weight, channels_first(target)) + bias[None, :, None]
    return (channels_first(source) - regressed).pow(2).mean(dim=2)


def matching_loss(errors: Sequence[torch.Tensor], what: Sequence[torch.Tensor], where: Sequence[torch.Tensor],
                  beta: float) -> torch.Tensor:
    """L_wfm = Σ_pairs β·mean over the batch of λ(x)·Σ_c w_c(x)·e_c(x)."""
    return sum(beta * ((e * w).sum(dim=1) * lam.squeeze(1)).mean() for e, w, lam in zip(errors, what, where))


class MetaNetworks(nn.Module):
    """Per pair: "what" = softmax(Linear(GAP(S^m))) over the source channels, its layer zero-initialised
    (w starts uniform); "where" = relu6(Linear(GAP(S^m))), its bias initialised to `where_init` (λ starts
    near it); both per example, from the source map alone (official WeightNetwork, LossWeightNetwork)."""

    def __init__(self, source_channels: Sequence[int], where_init: float):
        super().__init__()
        self.what = nn.ModuleList(nn.Linear(c, c) for c in source_channels)
        self.where = nn.ModuleList(nn.Linear(c, 1) for c in source_channels)
        for layer in self.what:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for layer in self.where:
            nn.init.constant_(layer.bias, where_init)

    def forward(self, sources: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        dtype = self.where[0].weight.dtype
        features = [pooled(s).to(dtype) for s in sources]
        what = [F.softmax(net(f), dim=1) for net, f in zip(self.what, features)]
        where = [F.relu6(net(f)) for net, f in zip(self.where, features)]
        return what, where


@dataclass
class LookAhead:
    """What the look-ahead steps need to know about the run: the model, the names of the trained weights
    with their SGD settings, the target layers of the pairs, and how the regressors are named."""

    model: TransferModel
    pairs: Sequence[Pair]
    regressor_names: Sequence[tuple[str, str]]  # per pair: the model's names of its regressor weight and bias
    beta: float

    @contextmanager
    def target_maps(self, store: dict) -> Iterator[None]:
        """Keep the outputs of the target layers of the pairs during the forward passes inside the block."""
        handles = []
        for name in dict.fromkeys(t for _, t in self.pairs):
            def keep(_m, _i, out, name=name):
                store[name] = out[0] if isinstance(out, tuple) else out

            handles.append(self.model.group(name).modules[-1].register_forward_hook(keep))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def errors(self, sources: Mapping[str, torch.Tensor], targets: Mapping[str, torch.Tensor],
               weights: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        return [pair_errors(sources[s], targets[t], weights[w], weights[b])
                for (s, t), (w, b) in zip(self.pairs, self.regressor_names)]

    def outer_loss(self, batch: Batch, sources: Mapping[str, torch.Tensor], what: Sequence[torch.Tensor],
                   where: Sequence[torch.Tensor], params: Sequence[tuple[str, torch.Tensor, dict, torch.Tensor | None]],
                   matching_steps: int) -> torch.Tensor:
        """The cross-entropy after `matching_steps` SGD steps on L_wfm alone and one on the cross-entropy,
        from the weights `params` (name, tensor, its optimizer group, its momentum buffer or None),
        differentiable in `what` and `where`. Buffers (BatchNorm statistics) are copies."""
        theta = {name: tensor.detach().requires_grad_() for name, tensor, _, _ in params}
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}
        momenta = {name: (None if m is None else m.detach()) for name, _, _, m in params}
        labels = batch["labels"]
        fixed = dict(self.model.named_parameters())  # the weights no step changes (frozen regressors)

        def run(weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
            maps: dict[str, torch.Tensor] = {}
            with self.target_maps(maps):
                logits = functional_call(self.model, {**weights, **buffers}, (batch,))
            return logits, maps

        def matching(weights):
            _, maps = run(weights)
            return matching_loss(self.errors(sources, maps, {**fixed, **weights}), what, where, self.beta)

        def cross_entropy(weights):
            return F.cross_entropy(run(weights)[0], labels)

        objectives: list[Callable] = [matching] * matching_steps + [cross_entropy]
        for objective in objectives:
            names = list(theta)
            grads = torch.autograd.grad(objective(theta), [theta[n] for n in names], create_graph=True,
                                        allow_unused=True)
            theta = {**theta}
            for (name, _, group, _), grad in zip(params, grads):
                theta[name], momenta[name] = sgd_step(theta[name], grad, momenta[name], group)
        return cross_entropy(theta)


def sgd_step(weight: torch.Tensor, grad: torch.Tensor | None, momentum: torch.Tensor | None,
             group: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One step of torch.optim.SGD as a differentiable function: d = g + wd·w; buf = μ·buf + (1 − dampening)·d
    (buf = d at first); w − lr·(d + μ·buf if nesterov else buf). A weight the objective does not reach
    counts as gradient 0 (the official look-ahead steps, whose zero_grad leaves zeros, update it too)."""
    d = torch.zeros_like(weight) if grad is None else grad
    if group["weight_decay"]:
        d = d + group["weight_decay"] * weight
    mu = group["momentum"]
    if mu:
        momentum = d if momentum is None else mu * momentum + (1 - group["dampening"]) * d
        d = d + mu * momentum if group["nesterov"] else momentum
    return weight - group["lr"] * d, momentum
