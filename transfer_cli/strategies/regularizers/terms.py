"""Loss terms shared by the regularising strategies, as pure functions of tensors (testable by hand)."""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import torch


def squared_distance(params: Sequence[torch.Tensor], refs: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """Σ‖p − ref‖² over the tensors (‖p‖² without refs): L2-SP's body term and the head's L2 term.

    A whole model's parameters are many tensors, so the value and its gradient 2(p − ref) are
    computed with multi-tensor ops (`_SquaredDistance`) instead of a chain of autograd nodes per
    tensor, and the differences become the gradient in place: on a CPU a fresh tensor the size of the
    model costs more (page faults) than the arithmetic. This keeps L2-SP's step near fine-tuning's.
    """
    if not params:
        return torch.zeros(())
    return _SquaredDistance.apply(len(params), *params, *(refs or ()))


class _SquaredDistance(torch.autograd.Function):
    """Σ‖p − ref‖²; backward once (the differences saved for it are turned into the gradient in place)."""

    @staticmethod
    def forward(ctx, count: int, *tensors: torch.Tensor) -> torch.Tensor:
        params, refs = list(tensors[:count]), list(tensors[count:])
        diffs = torch._foreach_sub(params, refs) if refs else params
        ctx.count, ctx.with_refs, ctx.done = count, bool(refs), False
        ctx.save_for_backward(*diffs)
        return torch.stack(torch._foreach_norm(diffs)).square().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.done:
            raise RuntimeError("squared_distance supports one backward pass per forward")
        ctx.done = True
        saved = list(ctx.saved_tensors)
        if ctx.with_refs:  # the differences are ours alone: scale them in place into the gradient
            torch._foreach_mul_(saved, 2 * grad)
            return (None, *saved, *([None] * ctx.count))
        return (None, *torch._foreach_mul(saved, 2 * grad))  # saved are the parameters themselves


def spectral_shrinkage(features: torch.Tensor, k: int) -> torch.Tensor:
    """Σ_{i=1..k} σ_{−i}²: the k smallest singular values of the (batch × features) matrix, squared (BSS)."""
    singular = torch.linalg.svdvals(features.float())  # descending
    return singular[-k:].pow(2).sum()


def channel_dim(feature_map: torch.Tensor) -> int:
    """Where the channels are: dim 1 of a conv map (B, C, H, W) or of pooled features (B, C), a 1x1 map
    (a group that ends after the pooling, as ConvNeXt's final norm); the last dim of a token map (B, T, D)."""
    if feature_map.dim() not in (2, 3, 4):
        raise ValueError(f"feature maps must be (B, C, H, W), (B, T, D) or (B, C); got shape {tuple(feature_map.shape)}")
    return 2 if feature_map.dim() == 3 else 1


def channel_count(feature_map: torch.Tensor) -> int:
    return feature_map.shape[channel_dim(feature_map)]


def channels_first(feature_map: torch.Tensor) -> torch.Tensor:
    """The map as (batch, channels, positions), whatever its layout."""
    return feature_map.movedim(channel_dim(feature_map), 1).reshape(len(feature_map), channel_count(feature_map), -1)


def attended_feature_distance(current: Iterable[torch.Tensor], reference: Iterable[torch.Tensor],
                              attention: Iterable[torch.Tensor]) -> torch.Tensor:
    """DELTA's feature-map term, scaled as TLlib does: Σ_j ½·C_j/P_j·Σ_{b,i} W_j(i)·‖FM_j^i(w) − FM_j^i(w⁰)‖².

    C_j channels and P_j positions (h·w, or tokens) of layer j; the sum runs over the batch.
    """
    total = []
    for fm, fm0, weights in zip(current, reference, attention):
        fm, fm0 = channels_first(fm).float(), channels_first(fm0).float()
        channels, positions = fm.shape[1], fm.shape[2]
        per_channel = (fm - fm0.detach()).pow(2).sum(dim=2)  # (batch, channels)
        total.append(0.5 * channels / positions * (per_channel * weights).sum())
    return torch.stack(total).sum()
