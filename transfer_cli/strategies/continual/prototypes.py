"""SimpleCIL and APER (Zhou et al., "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", 2023; LAMDA-PILOT's simplecil.py and aper_*.py).

Each class is its prototype, the mean of its training examples' features, computed once in the stage that
brings the class (the model in eval mode, the examples unaugmented, as PILOT's `replace_fc` does with its
test transform) and never changed afterwards; an example is classified by cosine similarity to every
prototype (PILOT's CosineLinear with the prototypes as weights; its learnable scale does not change the
argmax and is left out, so the logits, and the loss we log, are the cosines themselves).

SimpleCIL: the pretrained body, frozen and never trained (simplecil.json: tuned_epoch 0). APER: the body is
adapted on the first stage only, by the strategy `strategy.adapt` names (adapter, ssf, vpt, lora, bitfit or
finetune, with its shipped config) and a linear head on that stage's classes, then frozen; the features
are the pretrained body's and the adapted body's, concatenated (PILOT's aper_* keep both networks).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.config_files import CONFIG_DIR
from transfer_cli.engine.device import to_device
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES, Strategy
from transfer_cli.strategies.continual.stage_hooks import StageHooks
from transfer_cli.strategies.peft.shared import plain_copy

#: what APER may adapt its first stage with (PILOT: aper_adapter, aper_ssf, aper_vpt, aper_finetune)
ADAPTATIONS = ("adapter", "ssf", "vpt", "lora", "bitfit", "finetune")


@torch.no_grad()
def class_means(features: torch.Tensor, labels: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Rows start..end-1: the mean feature of each class; a class without an example is an error."""
    rows = []
    for label in range(start, end):
        chosen = labels == label
        if not bool(chosen.any()):
            raise TransferCliError(f"class {label} of the stage has no training example, so no prototype; "
                                   "check data.samples_per_class / data.classes")
        rows.append(features[chosen].mean(0))
    return torch.stack(rows)


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    return F.normalize(features.float(), dim=1) @ F.normalize(prototypes.to(features.device).float(), dim=1).T


@STRATEGIES.register("simplecil")
class SimpleCIL(StageHooks, Strategy):
    """Frozen pretrained body; each class its mean feature (prototype); cosine classifier; no training (SimpleCIL)."""

    export_caveat = "the prototype classifier is not part of the exported body (its checkpoints hold it)"

    def __init__(self, cfg: DictConfig, optim: DictConfig, regularizers=()):
        if regularizers:
            raise TransferCliError(f"strategy={cfg.name} trains nothing, so it cannot hold regularizers "
                                   f"({', '.join(r.name for r in regularizers)}); drop regularizers=[...]")
        super().__init__(cfg, optim)
        self.prototypes = torch.zeros(0)

    def training_strategy(self, stage: int) -> Optional[Strategy]:
        return None

    def begin_scenario(self, model: TransferModel) -> None:
        model.requires_grad_(False)  # never trained: results.json counts no trainable parameter

    def features(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return model.features(batch)

    def forward(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return cosine_logits(self.features(model, batch), self.prototypes)

    @torch.no_grad()
    def after_stage(self, stage: int, model: TransferModel, loader: Any, device: torch.device) -> None:
        was_training = model.training
        model.eval()
        features, labels = [], []
        for batch in loader:
            batch = to_device(batch, device)
            features.append(self.features(model, batch).float().cpu())
            labels.append(batch["labels"].cpu())
        model.train(was_training)
        start = len(self.prototypes)
        new = class_means(torch.cat(features), torch.cat(labels), start, int(torch.cat(labels).max()) + 1)
        self.prototypes = new if start == 0 else torch.cat([self.prototypes, new])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "prototypes": self.prototypes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.prototypes = state.get("prototypes", self.prototypes)


@STRATEGIES.register("aper")
class Aper(SimpleCIL):
    """SimpleCIL on the pretrained and a first-stage-adapted body's features, concatenated (APER)."""

    def __init__(self, cfg: DictConfig, optim: DictConfig, regularizers=()):
        adapt = str(cfg.adapt)
        if adapt not in ADAPTATIONS:
            raise TransferCliError(f"strategy.adapt={adapt}: APER adapts its first stage with one of "
                                   f"{', '.join(ADAPTATIONS)}")
        inner = OmegaConf.merge(OmegaConf.load(CONFIG_DIR / "strategy" / f"{adapt}.yaml"), cfg.get("options") or {})
        super().__init__(cfg, optim)
        self.adaptation = STRATEGIES.get(adapt)(inner, optim, regularizers)
        self.frozen_body: Optional[TransferModel] = None
        self.adapted: dict[str, Any] = {}  # what the first stage trained (results.json), kept once it is frozen

    def training_strategy(self, stage: int) -> Optional[Strategy]:
        return self.adaptation if stage == 0 else None

    def begin_scenario(self, model: TransferModel) -> None:
        """The pretrained body, kept frozen beside the one the first stage adapts (not SimpleCIL's freezing)."""
        self.frozen_body = plain_copy(model).eval().requires_grad_(False)

    def features(self, model: TransferModel, batch: Batch) -> torch.Tensor:
        return torch.cat([self.frozen_body.features(batch), model.features(batch)], dim=1)

    def after_stage(self, stage: int, model: TransferModel, loader: Any, device: torch.device) -> None:
        if stage == 0:
            self.adapted = {"adapted": {"method": self.cfg.adapt, "parameters": sum(
                p.numel() for p in model.parameters() if p.requires_grad)}, **self.adaptation.results()}
            model.requires_grad_(False)  # adapted once, then frozen
        super().after_stage(stage, model, loader, device)

    def results(self) -> dict[str, Any]:
        """The first stage's trained parameters (the adaptation's and the head's): the model ends frozen."""
        return self.adapted

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "adaptation": self.adaptation.state_dict(), "adapted": self.adapted}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        if "adaptation" in state:
            self.adaptation.load_state_dict(state["adaptation"])
        self.adapted = state.get("adapted", self.adapted)
