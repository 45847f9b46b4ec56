"""Bi-Tuning (Zhong et al., "Bi-tuning of Pre-trained Representations", 2020): two contrastive terms
with a momentum key encoder and per-class queues of its keys, beside the cross-entropy.

A projector maps the features h (what the head reads) to 128 dims, z = normalise(projector(h)). A key
encoder, a copy of the model and projector updated as θ_k ← m·θ_k + (1 − m)·θ, m = 0.999, with no
gradient, reads a second view of each image; its keys enter per-class queues of K = 40. With
temperature τ = 0.07, for an example of class c:
- projection term: its own key and the K queued keys of class c are positives, the other classes'
  queued keys negatives, for the query z;
- classifier term: h̃ = normalise([h, 1]) and the class weights w̃_c = normalise([W_c, b_c]) of the
  head, detached: the scores h̃·w̃_c and q·w̃_c for the queued keys q (normalise([h_k, 1])) of every
  class; those of class c are positives.
Each term is KL(uniform over the K + 1 positives ‖ softmax(scores / τ)), averaged over the batch, and
the loss is CE + weight·(both terms), weight 1.

What TLlib does (`tllib/regularization/bi_tuning.py`, `examples/.../bi_tuning.py`) and this module
follows: the defaults above (`--projection-dim 128 --K 40 --m 0.999 --T 0.07 --trade-off 1`); queues
start as random unit vectors; the key encoder is updated before it runs, and runs in training mode;
the projection term uses the queues before this batch's keys are enqueued, the classifier term the
queues after (TLlib's order); a class's queue is a ring buffer filled one key at a time. The projector
trains at the body's rate (TLlib: the backbone's 0.1×), here `optim.lr`.
Where this differs: TLlib draws the new head's weights from N(0, 0.01); here the head keeps the
runner's own init (a term changes the loss, not the model). The second view: TLlib applies its
training transform twice; here the query is the loader's batch (augmented only with
`data.augment=true`) and the key view is a random resized crop and flip of it (timm's, as
`data.augment`), drawn from torch's random stream; text has no augmentation, so its key view is the
same tokens (`key_view: auto`; the key encoder's dropout still differs).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.data.batch_augment import RandomResizedCropFlip
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.regularizers.base import REGULARIZERS, HeadInputTerm, attach, config_key
from transfer_cli.strategies.regularizers.source_task import forked_rng

KEY_VIEWS = ("auto", "augment", "same")


def queue_contrast(current: torch.Tensor, queued: torch.Tensor, labels: torch.Tensor, queue_size: int,
                   temperature: float) -> torch.Tensor:
    """KL(uniform over the positives ‖ softmax(scores / τ)), averaged over the batch.

    `current`: (B,) the example's own score; `queued`: (B, C·K) its scores against every queued entry,
    class-major (entry j belongs to class j // K); positives: the own score and class `labels[b]`'s K."""
    scores = torch.cat([current.unsqueeze(1), queued], dim=1) / temperature
    log_p = F.log_softmax(scores.float(), dim=1)
    entry_class = torch.arange(queued.shape[1], device=queued.device) // queue_size
    positive = torch.cat([torch.ones_like(labels, dtype=torch.bool).unsqueeze(1),
                          entry_class.unsqueeze(0) == labels.unsqueeze(1)], dim=1)
    share = 1.0 / (queue_size + 1)
    return (share * (math.log(share) - log_p) * positive).sum(dim=1).mean()


def with_bias_unit(x: torch.Tensor) -> torch.Tensor:
    """normalise([x, 1]) row by row."""
    return F.normalize(torch.cat([x, torch.ones_like(x[:, :1])], dim=1), dim=1)


class ClassQueues(nn.Module):
    """Per class, the last K keys of the key encoder: features with a bias unit and projections."""

    def __init__(self, feature_dim: int, projection_dim: int, classes: int, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("features", F.normalize(torch.randn(feature_dim + 1, classes, size), dim=0))
        self.register_buffer("projections", F.normalize(torch.randn(projection_dim, classes, size), dim=0))
        self.register_buffer("pointer", torch.zeros(classes, dtype=torch.long))

    @torch.no_grad()
    def push(self, features: torch.Tensor, projections: torch.Tensor, labels: torch.Tensor) -> None:
        """Enqueue the batch's keys in order, as one key at a time would: each class's pointer advances by
        its count, and where a class has more than K examples only its last K stay."""
        one_hot = F.one_hot(labels, self.pointer.numel())
        rank = (one_hot.cumsum(0) - one_hot).gather(1, labels.unsqueeze(1)).squeeze(1)
        count = one_hot.sum(0)
        keep = rank >= count[labels] - self.size
        position = (self.pointer[labels] + rank) % self.size
        classes, position = labels[keep], position[keep]
        self.features[:, classes, position] = features[keep].T.to(self.features.dtype)
        self.projections[:, classes, position] = projections[keep].T.to(self.projections.dtype)
        self.pointer.copy_((self.pointer + count) % self.size)


@REGULARIZERS.register("bi_tuning")
class BiTuning(HeadInputTerm):
    """Contrastive terms on projections and on the classifier's class weights, with a momentum key encoder."""

    needs_inputs = True  # the key encoder reads a second view of each batch's raw inputs

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.weight, self.momentum, self.temperature = float(cfg.weight), float(cfg.momentum), float(cfg.temperature)
        self.queue_size, self.projection_dim = int(cfg.queue_size), int(cfg.projection_dim)
        self.key_view = str(cfg.key_view)
        if self.key_view not in KEY_VIEWS:
            raise TransferCliError(f"{config_key(cfg, 'key_view')}={cfg.key_view}; use one of {', '.join(KEY_VIEWS)}")
        if not 0 <= self.momentum < 1 or self.temperature <= 0 or self.queue_size < 1:
            raise TransferCliError(f"{self.name}: momentum must be in [0, 1), temperature positive and queue_size "
                                   f"at least 1 (got {cfg.momentum}, {cfg.temperature}, {cfg.queue_size})")
        self.projector: nn.Module | None = None
        self.key: nn.ModuleDict | None = None  # the key encoder: a copy of the model and of the projector
        self.queues: ClassQueues | None = None
        self._restored: Mapping[str, Any] | None = None

    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        if self.key_view == "augment" and model.modality != "image":
            raise TransferCliError(f"{self.name}.key_view=augment: text has no augmentation; use auto or same")
        like = next(model.parameters())  # device and dtype of the new layers
        with forked_rng(model):  # the run's random stream stays as fine-tuning's
            projector = nn.Linear(model.feature_dim, self.projection_dim).to(like)
            self.queues = ClassQueues(model.feature_dim, self.projection_dim, model.head.out_features,
                                      self.queue_size).to(like)
        self.key = nn.ModuleDict({"model": copy.deepcopy(model), "projector": copy.deepcopy(projector)})
        self.key.requires_grad_(False).train()
        self.projector = attach(model, self, projector)
        query = dict(model.named_parameters())
        self._pairs = ([p for _, p in self.key.named_parameters()],
                       [query[n] for n, _ in self.key["model"].named_parameters()] + list(projector.parameters()))
        if self._restored is not None:
            self.load_state_dict(self._restored)
            self._restored = None

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        return [{"name": f"{self.name}_projector", "params": list(self.projector.parameters()), "lr": lr}]

    def second_view(self, model: TransferModel, batch: Batch) -> Batch:
        if self.key_view == "same" or (self.key_view == "auto" and model.modality != "image"):
            return batch
        images = batch["pixel_values"]
        draws = torch.rand(images.shape[0], RandomResizedCropFlip.DRAWS).to(images.device)
        with torch.device(images.device):  # the crop's parameters are built where the images are
            crop = RandomResizedCropFlip(images.shape[-2:])(images, draws)
        return {**batch, "pixel_values": crop}

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.head_input()
        if self.weight == 0:
            return {}
        labels = batch["labels"]
        query = F.normalize(self.projector(features), dim=1)
        with torch.no_grad():
            torch._foreach_lerp_(self._pairs[0], self._pairs[1], 1 - self.momentum)
            key_features = self.key["model"].features(self.second_view(model, batch))
            key = F.normalize(self.key["projector"](key_features), dim=1)
        queued = self.queues.projections.flatten(1).clone()  # (D, C·K), before this batch's keys are pushed
        projection = queue_contrast((query * key).sum(1), query @ queued, labels, self.queue_size, self.temperature)
        self.queues.push(with_bias_unit(key_features), key, labels)
        head = model.head
        weights = with_bias_unit_rows(head.weight, head.bias).detach()[labels]  # (B, F + 1): w̃ of each label
        hq = with_bias_unit(features)
        classifier = queue_contrast((hq * weights).sum(1), weights @ self.queues.features.flatten(1), labels,
                                    self.queue_size, self.temperature)
        return {f"{self.name}_projection": self.weight * projection, f"{self.name}_classifier": self.weight * classifier}

    def state_dict(self) -> dict[str, Any]:
        return {"key": self.key.state_dict(), "queues": self.queues.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.key is None:  # before setup: setup builds the key encoder and queues, then loads this
            self._restored = state
            return
        self.key.load_state_dict(state["key"])
        self.queues.load_state_dict(state["queues"])


def with_bias_unit_rows(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """normalise([W_c, b_c]) for every class c (a head without bias gets b = 0)."""
    bias = torch.zeros_like(weight[:, 0]) if bias is None else bias
    return F.normalize(torch.cat([weight, bias.unsqueeze(1)], dim=1), dim=1)
