"""results.json: the one summary of a finished run that tables and sweeps are built from.

Built here, beside the loop whose `FitResult` it summarises, so that reporting (which reads
results.json) never imports the engine.
"""
from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

import transfer_cli
from transfer_cli.engine.loop import FitResult


def build_results(cfg: DictConfig, fit: FitResult, model: torch.nn.Module, class_names: Sequence[str]) -> dict[str, Any]:
    """The summary; `class_names` are the head's outputs in order (what `predict` names its predictions by)."""
    state = fit.state
    return {
        "config": {
            "strategy": cfg.strategy.name,
            "backbone": cfg.backbone.name,
            "data": cfg.data.name,
            "seed": cfg.seed,
            "samples_per_class": cfg.data.get("samples_per_class"),
            "num_classes": len(class_names),
        },
        "class_names": list(class_names),
        "full_config": OmegaConf.to_container(cfg, resolve=True),
        "test": fit.test,
        "val": state.best_val,
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "steps": state.step,
        "params": {
            "total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        },
        "train_time_s": state.train_time_s,
        "samples_per_s": state.train_samples / state.train_time_s if state.train_time_s > 0 else 0.0,
        "device": fit.device,
        "precision": fit.precision,
        "versions": {"python": platform.python_version(), "transfer_cli": transfer_cli.__version__,
                     **{name: _version(name) for name in ("torch", "timm", "transformers")}},
    }


def _version(package: str) -> str:
    """Installed version, read without importing the package (transformers alone takes seconds)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
