"""DELTA (Li et al., ICLR 2019): keep the fine-tuned network's feature maps close to the pretrained
network's, channel by channel, weighting the channels the target task depends on most.

What TLlib does and this module follows (`tllib/regularization/delta.py`,
`examples/task_adaptation/image_classification/delta.py`):
- the term per layer j is ½·C_j/(h·w)·Σ_batch Σ_i W_j(i)·‖FM_j^i(w, x) − FM_j^i(w⁰, x)‖² (summed over the
  batch, not averaged), times the body trade-off α; the head gets β·½‖w_head‖²; weight decay is 0;
- the reference maps come from a frozen copy of the pretrained model in eval mode, without gradient;
- channel attention, once before training: train a new classifier on the frozen pretrained body
  (10 epochs, SGD with momentum), then on up to 10 batches zero each channel in turn and average the
  loss increase over the batches; standardise per layer (population std) and softmax(d / 5).
Where this differs: the maps are the outputs of layer groups (for a ResNet, the stages after their
residual add and ReLU; TLlib hooks the last conv3 of each stage), a channel is zeroed in the map itself
(TLlib zeroes the conv filter, the same for a bias-free conv; here it also covers transformer hidden
units, the last dim of (B, T, D) maps), and the attention classifier's rate is constant (TLlib decays
it 10× over 6 epochs). `attention: false` gives every channel weight 1/C_j: the same scale as the
attention path with uniform attention. The attention pass runs under a forked RNG, so it leaves the
run's random stream as fine-tuning would see it; where the body only chains its groups (ResNets) each
zeroed map runs through the layers above it only, about 4× faster than whole forwards on a ResNet-18
and the same numbers (tested).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from itertools import islice
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.backbones.model import HEAD, Batch, TransferModel
from transfer_cli.engine.device import to_device
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer, config_key
from transfer_cli.strategies.regularizers.terms import (attended_feature_distance, channel_count, channel_dim,
                                                 squared_distance)

ATTENTION_TEMPERATURE = 5.0  # softmax(d / 5), DELTA's paper and TLlib


def output_hook(module: nn.Module, fn) -> Any:
    """Hook `fn(map) -> map | None` on a group's output; tuple outputs (HF layers) pass their first item."""
    def hook(_module, _inputs, output):
        if isinstance(output, tuple):
            new = fn(output[0])
            return None if new is None else (new, *output[1:])
        return fn(output)

    return module.register_forward_hook(hook)


def zero_channel(i: int):
    def fn(fm: torch.Tensor) -> torch.Tensor:
        fm = fm.clone()
        fm.select(channel_dim(fm), i).zero_()
        return fm

    return fn


def train_probe(reference: TransferModel, loader: Any, device: torch.device, epochs: int, lr: float) -> None:
    """Fit the reference's head on its frozen body's features: the classifier whose loss scores channels.

    The reference is the frozen copy of the pretrained model; its head is otherwise unused, so the probe
    lives there and is saved with it."""
    head = reference.head.requires_grad_(True).train()
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, nesterov=True)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            batch = to_device(batch, device)
            with torch.no_grad():
                features = reference.features(batch)
            loss = F.cross_entropy(head(features), batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    head.requires_grad_(False).eval()


def ablation_losses(reference: TransferModel, name: str, batch: Batch) -> torch.Tensor:
    """The probe's loss with each channel of group `name`'s output zeroed in turn, one value per channel.

    Where the body only chains its groups (a ResNet), the groups below `name` run once and each ablation
    runs only the layers above it; otherwise (BERT's attention mask) each ablation is a whole forward."""
    names = reference.group_names()
    below = names[:names.index(name) + 1]
    labels = batch["labels"]
    if reference.runs_from(below, batch):
        output = reference.group_output(batch, name)

        def loss_without(i: int) -> torch.Tensor:
            return F.cross_entropy(reference.forward_from(below, zero_channel(i)(output)), labels)
    else:
        output = reference.feature_maps(batch, [name])[name]
        module = reference.group(name).modules[-1]

        def loss_without(i: int) -> torch.Tensor:
            handle = output_hook(module, zero_channel(i))
            try:
                return F.cross_entropy(reference(batch), labels)
            finally:
                handle.remove()
    return torch.stack([loss_without(i) for i in range(channel_count(output))])


@torch.no_grad()
def channel_attention(reference: TransferModel, layers: list[str], loader: Any, device: torch.device,
                      batches: int) -> list[torch.Tensor]:
    """Per layer: softmax(standardised mean loss increase when each channel is zeroed / 5)."""
    loader.set_epoch(0)
    batch_list = [to_device(b, device) for b in islice(loader, batches)]
    increases = []
    for name in layers:
        per_batch = [ablation_losses(reference, name, b) - F.cross_entropy(reference(b), b["labels"])
                     for b in batch_list]
        increases.append(torch.stack(per_batch).mean(dim=0))
    return [F.softmax((d - d.mean()) / d.std(unbiased=False).clamp_min(1e-12) / ATTENTION_TEMPERATURE, dim=0)
            for d in increases]


@REGULARIZERS.register("delta")
class Delta(Regularizer):
    """α·attention-weighted distance of feature maps to the pretrained model's + β/2‖w_head‖², no weight decay."""

    replaces_weight_decay = True
    needs_inputs = True  # the reference model runs on each batch's raw inputs

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.alpha, self.beta = float(cfg.alpha), float(cfg.beta)
        self.layers: list[str] = []
        self.reference: TransferModel | None = None
        self.attention: list[torch.Tensor] = []
        self._maps: dict[str, torch.Tensor] = {}
        self._restored: Mapping[str, Any] | None = None  # state loaded before setup (resume, eval)

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        body = model.body_group_names()
        self.layers = [str(n) for n in self.cfg.layers] if self.cfg.layers else body[1:]
        for name in self.layers:
            if name not in body:
                raise TransferCliError(f"{config_key(self.cfg, 'layers')}: {name!r} is not a body group; "
                                       f"this model has: {', '.join(body)}")
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if self._restored is not None:  # resume / eval: the saved reference and attention, not recomputed
            restored, self._restored = self._restored, None
            self.load_state_dict(restored)
            return
        forked = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=forked):
            if self.cfg.attention:
                train_probe(self.reference, train_loader, device, int(self.cfg.attention_epochs),
                            float(self.cfg.attention_lr))
                self.attention = channel_attention(self.reference, self.layers, train_loader, device,
                                                   int(self.cfg.attention_batches))
            else:
                self.attention = self._uniform(train_loader, device)

    def _uniform(self, loader: Any, device: torch.device) -> list[torch.Tensor]:
        batch = to_device(next(iter(loader)), device)
        with torch.no_grad():
            maps = self.reference.feature_maps(batch, self.layers)
        return [torch.full((channel_count(maps[n]),), 1 / channel_count(maps[n]), device=device) for n in self.layers]

    @contextmanager
    def observe(self, model: TransferModel) -> Iterator[None]:
        handles = [output_hook(model.group(n).modules[-1], self._keep(n)) for n in self.layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _keep(self, name: str):
        def fn(fm: torch.Tensor) -> None:
            self._maps[name] = fm

        return fn

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            reference = self.reference.feature_maps(batch, self.layers)
        current, self._maps = self._maps, {}
        head = [p for p in model.group(HEAD).parameters(model) if p.requires_grad]
        return {
            self.name: self.alpha * attended_feature_distance(
                [current[n] for n in self.layers], [reference[n] for n in self.layers], self.attention),
            f"{self.name}_head": self.beta / 2 * squared_distance(head),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"attention": self.attention, "reference": self.reference.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.reference is None:  # before setup: setup restores it instead of recomputing
            self._restored = state
            return
        self.reference.load_state_dict(state["reference"])
        device = next(self.reference.parameters()).device
        self.attention = [a.to(device) for a in state["attention"]]
