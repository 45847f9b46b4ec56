"""L2T-ww (Jang, Lee, Hwang & Shin, "Learning What and Where to Transfer", ICML 2019): match the frozen
source network's feature maps, with channel weights ("what") and layer-pair weights ("where") that
meta-networks learn so that the matching helps the target task.

For each pair (m, n) of a source layer m and a target layer n, a 1×1 regressor r maps T^n(x) to
S^m's channels and e_c = mean over positions of (S^m(x) − r(T^n(x)))²; the loss adds
L_wfm = Σ_pairs β·mean_batch λ(x)·Σ_c w_c(x)·e_c (`l2t_ww_meta`). Every step (`meta_every`), after the
real SGD step on CE + L_wfm, T = 2 look-ahead steps on L_wfm alone and one on CE are taken from the
new weights, the CE after them is differentiated back to the meta-networks, which Adam updates, and the
weights stay those of the real step (the official rollback).

What the official code (github.com/alinlab/L2T-ww, `train_l2t_ww.py`, `train/meta_optimizers.py`) does
and this module follows: β = 0.5; all pairs of source stages 1–4 × target stages 1–4 (here: every
body group but the first, for both); "what" a zero-initialised linear layer + softmax, "where"
relu6 of a linear layer with bias 1, both on the source map's global average; the regressors train
with the target network (its optimizer, rate and weight decay; here a group at `optim.lr`); the
meta-networks by Adam, lr 1e-4, weight decay 1e-4; T = 2; the source network frozen in eval mode;
the look-ahead differentiates through SGD with the run's momentum and weight decay. The official
target is trained from scratch (the knowledge enters only through L_wfm); `target_init: scratch`
re-initialises the body after the source copy is taken (each layer's `reset_parameters`, not the
architecture's own init scheme), and `pretrained` (the default here: few-shot targets need it) starts
from the pretrained weights. The official runs 200 epochs of SGD lr 0.1 cosine with batch 64 and an
ImageNet ResNet-34 source for a ResNet-18 target; here source and target are the same architecture.

In the real step the meta-networks' outputs are detached (their gradient comes only from the
look-ahead; the official code computes and then discards it). Refused: an optimizer other than SGD
(the look-ahead is SGD's), and several processes (the meta-update runs outside the data-parallel
step, so the processes' meta-networks would drift apart). Logged per epoch: `l2t_ww/where_mean`
(λ averaged over pairs and examples) and `l2t_ww/what_max` (the largest channel weight, mean).
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.engine import distributed
from transfer_cli.engine.device import to_device
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.regularizers.base import REGULARIZERS, TERM_PREFIX, EpochMeans, Regularizer, attach, config_key
from transfer_cli.strategies.regularizers.l2t_ww_meta import LookAhead, MetaNetworks, Pair, matching_loss
from transfer_cli.strategies.regularizers.source_task import forked_rng
from transfer_cli.strategies.regularizers.terms import channel_count

TARGET_INITS = ("pretrained", "scratch")


def reinitialise(module: nn.Module) -> None:
    """Random init of every layer that knows how (`reset_parameters`): training from scratch."""
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


@REGULARIZERS.register("l2t_ww")
class LearningWhatAndWhere(Regularizer):
    """Meta-learned, per-example weighted matching of the frozen source network's feature maps."""

    needs_inputs = True  # the source network runs on each batch's raw inputs

    def __init__(self, name, cfg):
        super().__init__(name, cfg)
        self.beta, self.matching_steps = float(cfg.beta), int(cfg.lookahead_steps)
        self.meta_every = int(cfg.meta_every)
        if str(cfg.target_init) not in TARGET_INITS:
            raise TransferCliError(f"{config_key(cfg, 'target_init')}={cfg.target_init}; use pretrained or scratch")
        if self.matching_steps < 0 or self.meta_every < 0:
            raise TransferCliError(f"{name}: lookahead_steps and meta_every must be >= 0 (meta_every 0: no meta-update)")
        self.source: TransferModel | None = None
        self.meta: MetaNetworks | None = None
        self.meta_optimizer: torch.optim.Optimizer | None = None
        self.pairs: list[Pair] = []
        self._restored: Mapping[str, Any] | None = None
        self._sources: dict[str, torch.Tensor] = {}
        self._targets: dict[str, torch.Tensor] = {}
        self._means = EpochMeans(name)
        self.real_steps = 0  # all of the run's (saved), for meta_every

    # ---- setup -------------------------------------------------------------------------------
    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        if distributed.place().world_size > 1:
            raise TransferCliError(f"{self.name}'s meta-update runs outside the data-parallel step, so each "
                                   "process's meta-networks would drift apart; run it in one process")
        self.pairs = self._pairs(model)
        self.source = copy.deepcopy(model).eval().requires_grad_(False)
        if str(self.cfg.target_init) == "scratch" and self._restored is None:
            reinitialise(model.body)
        channels = self._channels(train_loader, device)
        like = next(model.parameters())  # device and dtype of the new layers
        with forked_rng(model):  # new layers' init must not move the run's random stream
            regressors = nn.ModuleList(nn.Linear(channels[t], channels[s]) for s, t in self.pairs)
            self.meta = MetaNetworks([channels[s] for s, _ in self.pairs], float(self.cfg.where_init)).to(like)
        self.regressors = attach(model, self, regressors.to(like))
        self.meta_optimizer = torch.optim.Adam(self.meta.parameters(), lr=float(self.cfg.meta_lr),
                                               weight_decay=float(self.cfg.meta_weight_decay))
        prefix = f"{TERM_PREFIX}{self.name}"
        self.look_ahead = LookAhead(model, self.pairs, [(f"{prefix}.{i}.weight", f"{prefix}.{i}.bias")
                                                        for i in range(len(self.pairs))], self.beta)
        if self._restored is not None:
            self.load_state_dict(self._restored)
            self._restored = None

    def _pairs(self, model: TransferModel) -> list[Pair]:
        body = model.body_group_names()
        layers = [str(n) for n in self.cfg.layers] if self.cfg.layers else body[1:]
        for name in layers:
            if name not in body:
                raise TransferCliError(f"{config_key(self.cfg, 'layers')}: {name!r} is not a body group; "
                                       f"this model has: {', '.join(body)}")
        if self.cfg.pairs is None:
            return [(s, t) for s in layers for t in layers]
        pairs = [tuple(str(x) for x in pair) for pair in self.cfg.pairs]
        bad = [p for p in pairs if len(p) != 2 or p[0] not in body or p[1] not in body]
        if bad:
            raise TransferCliError(f"{config_key(self.cfg, 'pairs')}: {list(bad[0])} is not [source group, target "
                                   f"group]; this model's groups: {', '.join(body)}")
        return pairs

    @torch.no_grad()
    def _channels(self, loader: Any, device: torch.device) -> dict[str, int]:
        """Channel counts of the paired layers, from the source network on one batch (RNG untouched)."""
        batch = to_device(next(iter(loader)), device)
        with forked_rng(self.source):
            maps = self.source.feature_maps(batch, sorted({n for pair in self.pairs for n in pair}))
        return {n: channel_count(m) for n, m in maps.items()}

    def param_groups(self, model: TransferModel, lr: float) -> list[dict]:
        return [{"name": f"{self.name}_regressors", "params": list(self.regressors.parameters()), "lr": lr}]

    # ---- the real step -----------------------------------------------------------------------
    @contextmanager
    def observe(self, model: TransferModel) -> Iterator[None]:
        with self.look_ahead.target_maps(self._targets):
            yield

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        targets, self._targets = self._targets, {}
        with torch.no_grad():
            self._sources = self.source.feature_maps(batch, sorted({s for s, _ in self.pairs}))
            what, where = self.meta([self._sources[s] for s, _ in self.pairs])
        weights = dict(model.named_parameters())
        errors = self.look_ahead.errors(self._sources, targets, weights)
        self._means.add({"where_mean": torch.stack([w.mean() for w in where]).mean(),
                         "what_max": torch.stack([w.max(dim=1).values.mean() for w in what]).mean()})
        return {self.name: matching_loss(errors, what, where, self.beta)}

    def epoch_stats(self) -> dict[str, float]:
        return self._means.pop()

    # ---- the meta-update ---------------------------------------------------------------------
    def on_step_end(self, model: TransferModel, batch: Batch, optimizer: torch.optim.Optimizer) -> None:
        sources, self._sources = self._sources, {}
        self.real_steps += 1
        if not self.meta_every or self.real_steps % self.meta_every or not sources:
            return
        if not isinstance(optimizer, torch.optim.SGD):
            raise TransferCliError(f"{self.name}'s look-ahead steps are SGD's (as the official code); set optim=sgd")
        self.meta_optimizer.zero_grad(set_to_none=True)
        grads = self.meta_gradient(model, batch, sources, optimizer)
        for p, g in zip(self.meta.parameters(), grads):
            p.grad = None if g is None else g.detach()
        self.meta_optimizer.step()

    def meta_gradient(self, model: TransferModel, batch: Batch, sources: Mapping[str, torch.Tensor],
                      optimizer: torch.optim.SGD) -> tuple[torch.Tensor | None, ...]:
        """d CE(after the look-ahead steps) / d meta-parameters, at the model's current weights."""
        names = {id(p): n for n, p in model.named_parameters()}
        params = [(names[id(p)], p, group, optimizer.state.get(p, {}).get("momentum_buffer"))
                  for group in optimizer.param_groups for p in group["params"] if id(p) in names]
        with torch.enable_grad():
            what, where = self.meta([sources[s] for s, _ in self.pairs])
            outer = self.look_ahead.outer_loss(batch, sources, what, where, params, self.matching_steps)
            return torch.autograd.grad(outer, list(self.meta.parameters()), allow_unused=True)

    # ---- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"source": self.source.state_dict(), "meta": self.meta.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(), "real_steps": self.real_steps}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.meta is None:  # before setup: setup builds the networks, then loads this
            self._restored = state
            return
        self.source.load_state_dict(state["source"])
        self.meta.load_state_dict(state["meta"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.real_steps = int(state["real_steps"])
