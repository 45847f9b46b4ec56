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
        # where the body's weights came from: hub name, local file or folder and its sha256, or random init
        "weights": getattr(model, "weights_origin", {"source": "unknown"}),
        "test": {**fit.test, "of": fit.test_examples},  # n of the split's `of` examples were tested
        "val": state.best_val,
        "best_epoch": state.best_epoch,
        "epochs": state.epoch,
        "steps": state.step,
        "params": parameter_counts(model),
        "train_time_s": state.train_time_s,
        "samples_per_s": state.train_samples / state.train_time_s if state.train_time_s > 0 else 0.0,
        "device": fit.device,
        "precision": fit.precision,
        "versions": {"python": platform.python_version(), "transfer_cli": transfer_cli.__version__,
                     **{name: _version(name) for name in ("torch", "timm", "transformers")}},
    }


def parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Total and trainable parameters, the trainable share (%), and the bytes of the trainable ones: what a task
    must store beside the pretrained body when the rest of it stays frozen (the whole model for fine-tuning)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    return {"total": total, "trainable": count, "trainable_pct": 100.0 * count / total if total else 0.0,
            "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable)}


def _version(package: str) -> str:
    """Installed version, read without importing the package (transformers alone takes seconds)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def summary(results: dict[str, Any]) -> str:
    """The line `train` prints: the test numbers, on how many test examples, and where the time went."""
    test, spent = results["test"], results.get("time", {})
    examples = f"{test['n']} of {test['of']}" if test.get("of") not in (None, test["n"]) else f"{test['n']}"
    phases = ", ".join(f"{name} {spent[f'{name}_s']:.1f}s" for name in ("data", "model", "setup", "train", "val", "test")
                       if spent.get(f"{name}_s", 0.0) >= 0.05)
    stages = results.get("continual")  # scenario=class_incremental: its summary first
    scenario = (f"{len(stages['stages'])} stages: average incremental acc1 {stages['avg_incremental_acc1']:.4f}, "
                f"forgetting {stages['forgetting'] if stages['forgetting'] is None else round(stages['forgetting'], 4)}; "
                "last stage's ") if stages else ""
    return (f"{scenario}test acc1 {test['acc1']:.4f}  loss {test['loss']:.4f} on {examples} test examples  "
            f"(best epoch {results['best_epoch']}; {spent.get('wall_s', results['train_time_s']):.1f}s: {phases})")
