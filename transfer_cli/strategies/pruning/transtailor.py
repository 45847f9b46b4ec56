"""TransTailor (Liu, Cai, Guo & Chen, AAAI 2021): prune the pretrained model for the target task, then
fine-tune what is left.

Stage 1, target-aware pruning (in `setup`): a scaling factor α (initially 1) multiplies each filter's
output; with the pretrained weights frozen, α and the new head train on the target data. A filter's
importance is the first-order Taylor estimate of the loss change when its α goes to 0,
Θ = |α · ∂L/∂α| (the criterion of Molchanov et al., 2017, applied to α rather than to activations),
ℓ2-normalised within each layer so that one global ranking compares layers. The least important
filters are removed, α is retrained briefly (recovery) and the loop repeats until the target
(`prune.ratio` of filters, parameters or FLOPs) is met or, with `prune.max_acc_drop`, until the next
removal would cost more accuracy than allowed. Stage 2, importance-aware fine-tuning: the learned α is
folded into the remaining filters (here: into their BatchNorm scale and shift, which is exact) and the
pruned network fine-tunes for the loop's normal epochs.

What we could check of the paper: the title, the two stages and the abstract (arXiv 2103.01542); the
importance |α·∂L/∂α| matches the public re-implementations (e.g. github.com/locth/TransTailor); the
layer-wise ℓ2 normalisation is Molchanov et al.'s, which TransTailor builds on. The paper's
schedule and learning rates for α could not be read; our defaults are in configs/strategy/transtailor.yaml.

Removal is structural (torch-pruning, residual couplings included) and recorded as torch-pruning's
pruning history in the strategy state, so a resumed run or `transfer-cli eval` rebuilds the same
smaller network before loading its weights, without repeating stage 1.

Text encoders (BERT-like, `modality == "text"`) go through `pruning_transformer` instead: the units are
attention heads and FFN units, α scales each on its way into the dense layer that reads it, importance
is normalised per layer and unit kind, and a head or an FFN unit counts as one filter for
`target: filters`. The rest of the procedure is the same code.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from transfer_cli.backbones.model import TransferModel
from transfer_cli.engine.device import to_device
from transfer_cli.engine.evaluate import evaluate
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.pruning import cnn, transformer
from transfer_cli.strategies.base import STRATEGIES, Strategy

TARGETS = ("filters", "params", "flops")

#: a params/FLOPs round is removed in up to this many slices, with the target checked after each
CHUNKS = 8

log = logging.getLogger(__name__)


@STRATEGIES.register("transtailor")
class TransTailor(Strategy):
    """Target-aware filter pruning with learned scaling factors, then fine-tuning of the pruned model."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        prune = cfg.prune
        self.target = str(prune.target)
        self.ratio = float(prune.ratio)
        self.step = float(prune.step)
        self.max_acc_drop = None if prune.get("max_acc_drop") is None else float(prune.max_acc_drop)
        if self.target not in TARGETS:
            raise TransferCliError(f"strategy.prune.target={self.target} is not one of {', '.join(TARGETS)}")
        if not 0 < self.ratio < 1:
            raise TransferCliError(f"strategy.prune.ratio={self.ratio} must be in (0, 1): the fraction to remove")
        if not 0 < self.step <= 1:
            raise TransferCliError(f"strategy.prune.step={self.step} must be in (0, 1]: filters removed per round")
        self.history: Optional[list[cnn.HistoryEntry]] = None  # None: stage 1 has not run
        self.summary: dict[str, Any] = {}
        self.ops: Any = cnn  # the pruning module for the model's kind, chosen in setup

    @staticmethod
    def _ops(model: TransferModel) -> Any:
        """Convolution channels for image models, heads and FFN units for text encoders."""
        return transformer if model.modality == "text" else cnn

    # ---- hooks ---------------------------------------------------------------------------------
    def setup(self, model: TransferModel, train_loader: Any, device: torch.device) -> None:
        self.ops = ops = self._ops(model)
        if self.history is not None:  # resumed or evaluated: rebuild the structure, weights come next
            ops.replay(model, self.history)
        else:
            before = {"params": cnn.count_params(model), "flops": ops.count_flops(model)}
            rounds = self._prune(model, train_loader, device)
            after = {"params": cnn.count_params(model), "flops": ops.count_flops(model)}
            self.summary = {"params_before": before["params"], "params_after": after["params"],
                            "flops_before": before["flops"], "flops_after": after["flops"], **rounds}
        super().setup(model, train_loader, device)  # terms see the pruned network

    def results(self) -> dict[str, Any]:
        return {"pruning": dict(self.summary)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": self.history, "summary": self.summary}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = None if state.get("history") is None else [tuple(e) for e in state["history"]]
        self.summary = dict(state.get("summary", {}))

    # ---- stage 1 -------------------------------------------------------------------------------
    def _prune(self, model: TransferModel, loader: Any, device: torch.device) -> dict[str, Any]:
        """Train α, rank, remove, recover, until the target; fold α in; leave every weight trainable."""
        ops = self.ops
        graph = ops.dependency_graph(model)
        groups = ops.channel_groups(model, graph)
        alpha = ops.ScalingFactors(groups)
        filters_before = sum(g.size for g in groups)
        start = self._measure(model, groups)
        for p in model.body.parameters():
            p.requires_grad_(False)
        epoch = self._train_alpha(model, alpha, loader, device, int(self.cfg.alpha.epochs), epoch=0)
        reference_acc = self._accuracy(model, loader, device) if self.max_acc_drop is not None else None
        reductions, stop = [], "target"
        while not reductions or reductions[-1] < self.ratio:
            importance = cnn.taylor_importance(alpha.alpha, self._alpha_grad(model, alpha, loader, device))
            count = self._round_size(groups, filters_before, start)
            removed, early = self._round(model, graph, alpha, importance, count, start, reference_acc, loader, device)
            groups = ops.channel_groups(model, graph)
            if removed:
                reductions.append(self._reduction(start, self._measure(model, groups)))
                log.info("transtailor round %d: %d filters removed, %s down %.1f%% (target %.1f%%)",
                         len(reductions), removed, self.target, 100 * reductions[-1], 100 * self.ratio)
                epoch = self._train_alpha(model, alpha, loader, device, int(self.cfg.alpha.recovery_epochs), epoch)
            if early:
                stop = early
                break
        alpha.fold(groups)
        for p in model.parameters():
            p.requires_grad_(True)
        self.history = ops.history_of(graph)
        return {"target": self.target, "ratio": self.ratio, "reduction_per_round": reductions, "stopped_by": stop,
                "filters_before": filters_before, "filters_after": sum(g.size for g in groups)}

    def _measure(self, model: TransferModel, groups: list[cnn.ChannelGroup]) -> float:
        if self.target == "filters":
            return float(sum(g.size for g in groups))
        return float(cnn.count_params(model) if self.target == "params" else self.ops.count_flops(model))

    @staticmethod
    def _reduction(start: float, now: float) -> float:
        return 1.0 - now / start

    def _round_size(self, groups: list[cnn.ChannelGroup], filters_before: int, start: float) -> int:
        """Filters to remove this round: a `step` fraction of the prunable filters the model started
        with (so there are at most 1/step rounds); for a filters target no more than it needs (params
        and FLOPs are measured after each round instead)."""
        count = max(1, math.ceil(self.step * filters_before))
        if self.target == "filters":
            count = min(count, math.ceil(self.ratio * start) - int(start - sum(g.size for g in groups)))
        return count

    def _round(self, model, graph, alpha, importance, count: int, start: float, reference_acc, loader,
               device) -> tuple[int, Optional[str]]:
        """Remove up to `count` of the least important filters: at once for a filters target; for a
        params or FLOPs target in slices of count/CHUNKS, measured in between, stopping at the slice that
        reaches the target (what a filter costs differs from layer to layer). Returns the filters removed
        and, if it stopped for another reason, why."""
        size = count if self.target == "filters" else max(1, math.ceil(count / CHUNKS))
        removed = 0
        while removed < count:
            plan = cnn.least_important(importance, min(size, count - removed))
            if not plan:
                return removed, "every layer is down to one filter"
            if reference_acc is not None and self._masked_drop(model, alpha, plan, loader, device, reference_acc):
                return removed, "max_acc_drop"
            kept = self._remove(model, graph, alpha, plan)
            importance = {name: scores[kept[name]] if name in kept else scores for name, scores in importance.items()}
            removed += sum(len(channels) for channels in plan.values())
            if self.target != "filters" and self._reduction(start, self._measure(model, [])) >= self.ratio:
                break
        return removed, None

    def _remove(self, model, graph, alpha: cnn.ScalingFactors,
                plan: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
        """Remove `plan`'s filters, narrow α to match; returns each pruned group's mask of kept filters."""
        alpha.remove()
        self.ops.remove_channels(model, graph, plan)
        kept = {}
        for name, channels in plan.items():
            kept[name] = torch.ones(alpha.alpha[name].numel(), dtype=torch.bool)
            kept[name][channels] = False
            alpha.keep(name, kept[name])
        alpha.attach(self.ops.channel_groups(model, graph))
        return kept

    # ---- training α ----------------------------------------------------------------------------
    def _batches(self, loader: Any, epoch: int, device: torch.device):
        loader.set_epoch(epoch)
        for batch in loader:
            yield to_device(batch, device)

    def _train_alpha(self, model, alpha: cnn.ScalingFactors, loader, device, epochs: int, epoch: int) -> int:
        """α and the head train, the pretrained body is frozen (BatchNorm statistics too: eval mode)."""
        params = alpha.parameters() + list(model.head.parameters())
        optimizer = torch.optim.SGD(params, lr=float(self.cfg.alpha.lr), momentum=float(self.cfg.alpha.momentum))
        model.eval()
        for _ in range(epochs):
            for batch in self._batches(loader, epoch, device):
                loss = F.cross_entropy(model(batch), batch["labels"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            epoch += 1
        return epoch

    def _alpha_grad(self, model, alpha: cnn.ScalingFactors, loader, device) -> dict[str, torch.Tensor]:
        """∂L/∂α of the mean training loss over one pass (batches weighted by size)."""
        model.eval()
        for a in alpha.parameters():
            a.grad = None
        total = 0
        for batch in self._batches(loader, 0, device):
            n = batch["labels"].numel()
            (F.cross_entropy(model(batch), batch["labels"], reduction="sum")).backward()
            total += n
        grads = {name: a.grad.detach() / total for name, a in alpha.alpha.items()}
        for p in alpha.parameters() + list(model.head.parameters()):
            p.grad = None
        return grads

    def _accuracy(self, model, loader, device) -> float:
        return evaluate(model, self, loader, device, "fp32")["acc1"]

    def _masked_drop(self, model, alpha, plan, loader, device, reference: float) -> bool:
        """Whether removing `plan` would cost more than max_acc_drop of training accuracy: the
        removal is exact, so setting those α to 0 shows the pruned model's accuracy before pruning."""
        saved = {name: alpha.alpha[name].detach().clone() for name in plan}
        with torch.no_grad():
            for name, channels in plan.items():
                alpha.alpha[name][channels] = 0.0
        accuracy = self._accuracy(model, loader, device)
        with torch.no_grad():
            for name, value in saved.items():
                alpha.alpha[name].copy_(value)
        return reference - accuracy > self.max_acc_drop
