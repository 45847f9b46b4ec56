"""BSS, Batch Spectral Shrinkage (Chen et al., NeurIPS 2019): penalise the smallest singular values of
the batch's penultimate features, the directions fine-tuning has no data to fit (negative transfer).

Matches TLlib's `tllib/regularization/bss.py` (η·Σ_{i=1..k} σ_{−i}² on the (batch × features) matrix).
The features are what the head reads in the training forward pass (a hook on the head's input), never
a second forward: so BSS works whatever runs the body (a feature cache, routing, adapters).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer
from transfer_cli.strategies.regularizers.terms import spectral_shrinkage


@REGULARIZERS.register("bss")
class BatchSpectralShrinkage(Regularizer):
    """η·Σ σ_{−i}² of the batch's penultimate features (the k smallest singular values)."""

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight, self.k = float(cfg.weight), int(cfg.k)
        self._features: Optional[torch.Tensor] = None

    @contextmanager
    def observe(self, model: TransferModel) -> Iterator[None]:
        def keep(_head, inputs):
            self._features = inputs[0]

        handle = model.head.register_forward_pre_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        features, self._features = self._features, None
        return {self.name: self.weight * spectral_shrinkage(features, self.k)}
