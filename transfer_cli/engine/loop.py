"""The training loop: one for every strategy, read top to bottom in `fit`.

The loop owns the device, precision, optimizer, schedule, checkpoints and metrics; the strategy
decides what trains (`param_groups`, `on_epoch_start`), how the model runs (`forward`) and what is
added to the loss (`penalty`). The loop never asks which strategy it runs.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from tqdm import tqdm

from transfer_cli.backbones.model import TransferModel
from transfer_cli.engine.checkpoint import Checkpoints
from transfer_cli.engine.device import autocast, resolve_device, resolve_precision, to_device
from transfer_cli.engine.evaluate import evaluate
from transfer_cli.engine.optim import (build_optimizer, group_learning_rates, load_state_by_name, lr_factor,
                                       set_learning_rates, state_by_name)
from transfer_cli.engine.seeding import rng_state, set_rng_state
from transfer_cli.errors import TransferCliError
from transfer_cli.io import append_jsonl, read_jsonl, write_jsonl
from transfer_cli.strategies.base import Strategy


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the next epoch to run
    step: int = 0  # optimizer steps taken
    best_epoch: int = -1
    best_val_acc1: float = -math.inf
    best_val_loss: float = math.inf
    epochs_since_best: int = 0
    train_time_s: float = 0.0
    train_samples: int = 0


@dataclass
class FitResult:
    state: TrainState
    test: dict[str, float]
    val: dict[str, float]
    device: str
    precision: str


class Trainer:
    def __init__(self, model: TransferModel, strategy: Strategy, train_loader, val_loader, test_loader,
                 cfg: DictConfig, run_dir: Path):
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.model = model
        self.strategy = strategy
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.run_dir = Path(run_dir)
        self.checkpoints = Checkpoints(self.run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.device = resolve_device(str(self.tcfg.device))
        self.precision = resolve_precision(str(self.tcfg.precision), self.device)
        self.channels_last = _channels_last(self.tcfg.channels_last, self.device, model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.steps_per_epoch = min(len(train_loader), self.tcfg.max_train_batches or len(train_loader))
        self.total_steps = int(self.tcfg.max_epochs) * self.steps_per_epoch
        self.optimizer: Optional[torch.optim.Optimizer] = None

    # ---------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        if self.tcfg.num_threads:
            torch.set_num_threads(int(self.tcfg.num_threads))
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.strategy.setup(self.model, self.train_loader, self.device)
        self.forward = torch.compile(self.strategy.forward) if self.tcfg.compile else self.strategy.forward

        state, carried_optimizer_state = self._start_or_resume()
        val: dict[str, float] = {}
        for epoch in range(state.epoch, int(self.tcfg.max_epochs)):
            rebuild = self.strategy.on_epoch_start(epoch, self.model)
            if self.optimizer is None or rebuild:
                carried = state_by_name(self.optimizer, self.model) if self.optimizer else carried_optimizer_state
                self._build_optimizer(carried)

            started = time.perf_counter()
            train = self._train_epoch(epoch, state)
            train_time = time.perf_counter() - started
            val = evaluate(self.model, self.strategy, self.val_loader, self.device, self.precision,
                           self.tcfg.max_eval_batches)
            stop = self.strategy.on_epoch_end(epoch, self.model, val)

            state.epoch = epoch + 1
            state.train_time_s += train_time
            state.train_samples += train.pop("samples")
            improved = self._track_best(state, epoch, val)
            append_jsonl(self.metrics_path, {
                "epoch": epoch,
                "step": state.step,
                "trainable_groups": self.model.trainable_group_names(),
                "lr": group_learning_rates(self.optimizer),
                **{f"train_{k}": v for k, v in train.items()},
                "val_loss": val["loss"],
                "val_acc1": val["acc1"],
                "best": improved,
                "epoch_time_s": train_time,
            })
            self._save_checkpoint(state)  # after the metrics line: a resume drops lines past the checkpoint
            patience = self.tcfg.early_stopping_patience
            if stop or (patience is not None and state.epochs_since_best >= int(patience)):
                break

        if state.best_epoch >= 0:
            self.checkpoints.load_best_into(self.model)
        test = evaluate(self.model, self.strategy, self.test_loader, self.device, self.precision,
                        self.tcfg.max_eval_batches)
        return FitResult(state, test, val, str(self.device), self.precision)

    # ---------------------------------------------------------------------------------------------
    def _start_or_resume(self) -> tuple[TrainState, dict]:
        saved = self.checkpoints.load_last()
        if saved is None:
            if self.metrics_path.exists():
                self.metrics_path.unlink()  # a run that died before its first checkpoint starts over
            return TrainState(), {}
        if not self.tcfg.resume:
            raise TransferCliError(
                f"{self.run_dir} already holds a run; add trainer.resume=true to continue it, "
                "or write to a new folder (hydra.run.dir=...)"
            )
        self.model.load_state_dict(saved["model"])
        self.strategy.load_state_dict(saved["strategy"])
        self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        state = TrainState(**saved["train_state"])
        # epochs after the checkpoint were not finished: drop their lines
        kept = [r for r in read_jsonl(self.metrics_path) if r["epoch"] < state.epoch]
        write_jsonl(self.metrics_path, kept)
        return state, saved["optimizer"]

    def _build_optimizer(self, carried_state: dict) -> None:
        groups = self.strategy.param_groups(self.model, float(self.cfg.optim.lr))
        if not groups:
            raise TransferCliError("nothing to train: the strategy froze every layer group, the head included")
        self.optimizer = build_optimizer(groups, self.cfg.optim)
        load_state_by_name(self.optimizer, self.model, carried_state)

    def _train_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        model, optimizer = self.model, self.optimizer
        model.train()
        self.train_loader.set_epoch(epoch)
        trainable = [p for g in optimizer.param_groups for p in g["params"]]
        losses: list[torch.Tensor] = []
        penalty_sums: dict[str, torch.Tensor] = {}
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        samples = 0
        started = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch}", leave=False, disable=not self._progress())
        for i, batch in enumerate(islice(self.train_loader, self.steps_per_epoch)):
            set_learning_rates(optimizer, lr_factor(state.step, self.total_steps, self.steps_per_epoch,
                                                    self.cfg.sched))
            batch = to_device(batch, self.device, self.channels_last)
            with autocast(self.device, self.precision):
                logits = self.forward(model, batch)
                loss = F.cross_entropy(logits.float(), batch["labels"])
                penalties = self.strategy.penalty(model, batch, logits)
                total = loss + sum(penalties.values()) if penalties else loss
            optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            if self.tcfg.grad_clip:
                self.scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, float(self.tcfg.grad_clip))
            self.scaler.step(optimizer)
            self.scaler.update()
            state.step += 1

            losses.append(total.detach())
            for name, value in penalties.items():
                penalty_sums[name] = penalty_sums.get(name, 0) + value.detach().float()
            correct += (logits.detach().argmax(1) == batch["labels"]).sum()
            samples += batch["labels"].numel()
            if (i + 1) % int(self.tcfg.log_every) == 0 or i + 1 == self.steps_per_epoch:
                self._check_finite(losses, epoch, state.step)
                bar.set_postfix(loss=f"{losses[-1].item():.4f}",
                                samples_per_s=f"{samples / (time.perf_counter() - started):.0f}")
            bar.update()
        bar.close()
        elapsed = time.perf_counter() - started
        steps = max(len(losses), 1)
        return {
            "loss": torch.stack(losses).mean().item() if losses else float("nan"),
            "acc1": correct.item() / max(samples, 1),
            **{f"penalty/{k}": (v / steps).item() for k, v in penalty_sums.items()},
            "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "samples": samples,
        }

    def _check_finite(self, losses: list[torch.Tensor], epoch: int, step: int) -> None:
        finite = torch.isfinite(torch.stack(losses))
        if bool(finite.all()):
            return
        bad_step = step - len(losses) + int((~finite).nonzero()[0]) + 1
        kept = f"{self.checkpoints.last} (after epoch {epoch - 1})" if self.checkpoints.last.exists() else "none yet"
        raise TransferCliError(
            f"the loss became NaN/inf at step {bad_step} (epoch {epoch}); training stopped, last good checkpoint: "
            f"{kept}; lower optim.lr or set trainer.grad_clip"
        )

    def _track_best(self, state: TrainState, epoch: int, val: dict[str, float]) -> bool:
        """Best epoch = highest validation accuracy, ties broken by lower validation loss."""
        better = (val["acc1"], -val["loss"]) > (state.best_val_acc1, -state.best_val_loss)
        if better:
            state.best_epoch, state.best_val_acc1, state.best_val_loss = epoch, val["acc1"], val["loss"]
            state.epochs_since_best = 0
            self.checkpoints.save_best(self.model, epoch)
        else:
            state.epochs_since_best += 1
        return better

    def _save_checkpoint(self, state: TrainState) -> None:
        self.checkpoints.save_last({
            "model": self.model.state_dict(),
            "optimizer": state_by_name(self.optimizer, self.model),
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng": rng_state(),
            "train_state": asdict(state),
        })

    def _progress(self) -> bool:
        setting = self.tcfg.progress
        return sys.stderr.isatty() if setting == "auto" else bool(setting)


def _channels_last(setting: Any, device: torch.device, model: TransferModel) -> bool:
    if setting == "auto":
        return device.type == "cuda" and model.modality == "image"
    return bool(setting)
