"""Frozen features computed once: train the groups above a frozen bottom prefix on its cached outputs.

When the bottom k layer groups are frozen, their output for an example is the same every epoch,
provided that (1) the input is the same (no random augmentation), (2) the groups normalise with
fixed statistics (BatchNorm in eval mode, `strategy.bn=freeze`) and (3) they draw no random numbers
(no active dropout / drop-path). Then the prefix runs once per example, and every later epoch trains
the groups above it on the stored outputs. The result equals the uncached run's: batches come in the
same order (the loader's own per-epoch order), and since the prefix draws no random numbers the
layers above see the same random stream (their dropout).

The prefix is whatever bottom run of body groups is frozen when a split is iterated, so layer
schedules get a cache per stage; a cache is keyed by the prefix's parameters and buffers (their
identity and version counters), so loading other weights (a stage's best, the best epoch before
testing) recomputes it. The whole body frozen (a linear probe) caches the pooled features the head
reads. Strategies use it through `wrap_loader` and `forward`; the loop knows nothing of it.

Setting (`strategy.cache_features`): `auto` caches when valid, `true` requires it (one error line
saying why not), `false` never caches.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.data.loaders import BatchLoader
from transfer_cli.engine.device import to_device
from transfer_cli.errors import TransferCliError

log = logging.getLogger(__name__)

#: batch key of a cached batch: the frozen prefix's outputs, in place of the raw inputs
CACHED = "frozen_features"

Cut = tuple[str, ...]


def cache_setting(value: Any) -> Union[str, bool]:
    """Read `strategy.cache_features`: auto, true or false."""
    if value == "auto" or isinstance(value, bool):
        return value
    raise TransferCliError(f"strategy.cache_features={value!r}; use auto (cache when valid), true or false")


def frozen_prefix(model: TransferModel) -> Cut:
    """The body groups frozen from the bottom up, stopping at the first trainable one."""
    cut = []
    for name in model.body_group_names():
        if model.is_trainable(name):
            break
        cut.append(name)
    return tuple(cut)


@dataclass
class _Entry:
    key: tuple
    features: torch.Tensor
    labels: torch.Tensor


class FeatureCache:
    """The cached prefix outputs of each split, and the checks that decide whether caching is exact."""

    def __init__(self, setting: Any):
        self.setting = cache_setting(setting)
        self.model: Optional[TransferModel] = None
        self.device = torch.device("cpu")
        self.cut: Cut = ()  # the prefix whose outputs the batches being served hold
        self._entries: dict[str, _Entry] = {}
        self._refused: dict[Cut, str] = {}  # cut -> why it cannot be cached
        self._accepted: set[Cut] = set()

    @property
    def required(self) -> bool:
        return self.setting is True

    def bind(self, model: TransferModel, device: torch.device) -> None:
        """Called from the strategy's setup: the model whose prefix is cached, on its device."""
        self.model, self.device = model, torch.device(device)

    def wrap(self, split: str, loader: Any) -> Any:
        return loader if self.setting is False else CachedLoader(self, split, loader)

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        """Logits for a batch: from the cached prefix outputs when it carries them, else the whole model."""
        if CACHED not in batch:
            return model(batch)
        return self._resume(self.cut, batch[CACHED])

    # ---- which cut, and whether it can be cached ---------------------------------------------
    def lookup(self, split: str, loader: Any) -> Optional[_Entry]:
        """The split's cache for the current frozen prefix, computing it on first use; None: run uncached."""
        if self.model is None:
            return None
        cut = frozen_prefix(self.model)
        if not cut or cut in self._refused:
            return None
        key = (cut, self._fingerprint(cut))
        entry = self._entries.get(split)
        if entry is None or entry.key != key:
            self._entries.pop(split, None)  # free the stale cache before computing the new one
            entry = self._build(split, loader, cut, key)
        if entry is not None:
            self.cut = cut
        return entry

    def refusal(self, cut: Cut) -> str:
        """Why `cut` is not cached (after a lookup that returned None)."""
        return self._refused.get(cut, "the split is empty")

    def _build(self, split: str, loader: Any, cut: Cut, key: tuple) -> Optional[_Entry]:
        # the decision is taken on the training split, in training mode: val and test wait for it
        accepted = cut in self._accepted
        if not accepted and split != "train":
            return None
        result = (None if accepted else self._static_reason(loader, cut)) or self._compute(loader, cut, not accepted)
        if isinstance(result, str):
            self._refuse(cut, result)
            return None
        if result is None:  # an empty split: nothing to cache
            return None
        self._accepted.add(cut)
        entry = _Entry(key, *result)
        self._entries[split] = entry
        return entry

    def _refuse(self, cut: Cut, reason: str) -> None:
        if self.required:
            raise TransferCliError(f"strategy.cache_features=true, but {reason}; "
                                   "set strategy.cache_features=auto to train without the cache")
        self._refused[cut] = reason
        log.info("not caching the frozen groups' features: %s", reason)

    def _static_reason(self, loader: Any, cut: Cut) -> Optional[str]:
        """Why this cut cannot be cached, from the loader and the model alone (None: no reason yet)."""
        if not isinstance(loader, BatchLoader):
            return "the training loader cannot replay its order of examples"
        if loader.augment:
            return "data.augment=true: random augmentation gives the frozen groups a new input every epoch"
        for name in cut:
            for module in self.model.group(name).modules:
                if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules()):
                    return (f"group {name} normalises with batch statistics in training (strategy.bn=train); "
                            "use strategy.bn=freeze")
        return None

    def _compute(self, loader: BatchLoader, cut: Cut, check: bool) -> Union[tuple[torch.Tensor, ...], str, None]:
        """Run the prefix over the split once, in stored order, in the mode the caller set (train or eval):
        its outputs and labels, None for an empty split, or why the cut cannot be cached.

        With `check`, the first batch also shows whether the prefix draws random numbers and whether
        the model can run from the cut. No RNG state changes.
        """
        outputs, labels = [], []
        devices = [self.device] if self.device.type == "cuda" else []
        with loader.stored_order(), torch.no_grad(), torch.random.fork_rng(devices=devices):
            for batch in loader:
                batch = to_device(batch, self.device)
                before = _rng_states(self.device) if check else None
                hidden = self._compute_batch(batch, cut)
                if check:
                    check = False
                    if not all(torch.equal(a, b) for a, b in zip(before, _rng_states(self.device))):
                        return (f"the frozen groups {', '.join(cut)} draw random numbers in training (dropout or "
                                "drop-path in them): set their rates to 0")
                    reason = self._check_resume(batch, cut)
                    if reason is not None:
                        return reason
                if outputs and hidden.shape[1:] != outputs[0].shape[1:]:
                    return f"the output of group {cut[-1]} changes shape between batches (padded text)"
                outputs.append(hidden)
                labels.append(batch["labels"])
        if not outputs:
            return None
        return torch.cat(outputs), torch.cat(labels)

    def _check_resume(self, batch: Batch, cut: Cut) -> Optional[str]:
        """Compare the model run from the cut with the whole model on one batch (the head alone after a
        whole frozen body is exact by construction)."""
        if self._whole_body(cut) or self.model.runs_from(cut, batch):
            return None
        return (f"this backbone cannot run from the output of group {cut[-1]} (its forward does more than chain "
                "its groups)")

    # ---- helpers -----------------------------------------------------------------------------
    def _whole_body(self, cut: Cut) -> bool:
        return len(cut) == len(self.model.body_group_names())

    def _compute_batch(self, batch: Batch, cut: Cut) -> torch.Tensor:
        if self._whole_body(cut):
            return self.model.features(batch)
        return self.model.group_output(batch, cut[-1])

    def _resume(self, cut: Cut, hidden: torch.Tensor) -> torch.Tensor:
        if self._whole_body(cut):
            return self.model.head(hidden)
        return self.model.forward_from(cut, hidden)

    def _fingerprint(self, cut: Cut) -> tuple:
        """Identity and version counter of every parameter and buffer in the prefix: any in-place change
        (an optimizer step, load_state_dict, running statistics) bumps a version."""
        tensors = []
        for name in cut:
            group = self.model.group(name)
            tensors += group.parameters(self.model)
            tensors += [b for module in group.modules for b in module.buffers()]
        return tuple((id(t), t._version) for t in tensors)


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


class CachedLoader:
    """A loader that serves the cached prefix outputs, in its inner loader's order, when the cache holds them.

    Otherwise (nothing frozen, cache refused) it is the inner loader. Everything else (length,
    set_epoch, attributes) is the inner loader's.
    """

    def __init__(self, cache: FeatureCache, split: str, loader: Any):
        self.cache, self.split, self.loader = cache, split, loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Batch]:
        entry = self.cache.lookup(self.split, self.loader)
        if entry is None:
            yield from self.loader
            return
        for index in self.loader.batch_indices():
            index = index.to(entry.features.device)
            yield {CACHED: entry.features[index], "labels": entry.labels[index]}
