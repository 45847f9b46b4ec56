"""The training loop: one for every strategy, read top to bottom in `fit`.

The loop owns the device, precision, optimizer, schedule, checkpoints and metrics; the strategy
decides what trains (`param_groups`, `on_epoch_start`), how the model runs (`forward`) and what is
added to the loss (`penalty`). The loop never asks which strategy it runs.
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from transfer_cli.backbones.model import TransferModel
from transfer_cli.engine import distributed
from transfer_cli.engine.checkpoint import Checkpoints
from transfer_cli.engine.device import autocast, resolve_device, resolve_precision, to_device, use_channels_last
from transfer_cli.engine.evaluate import tally
from transfer_cli.engine.metrics import check_select_by, scalars, selection_key
from transfer_cli.engine.mid_epoch import MidEpoch
from transfer_cli.engine.optim import (build_optimizer, group_learning_rates, load_state_by_name, lr_factor,
                                       set_learning_rates, state_by_name)
from transfer_cli.engine.seeding import rng_state, set_rng_state
from transfer_cli.engine.stop_signals import StopRequests
from transfer_cli.engine.timing import Stopwatch, val_every, validates
from transfer_cli.errors import TransferCliError
from transfer_cli.io import append_jsonl, read_jsonl, write_jsonl
from transfer_cli.reporting.trackers import Tracker
from transfer_cli.run_folder import RunFolder
from transfer_cli.strategies.base import Strategy


@dataclass
class TrainState:
    """Where training stands; saved in every checkpoint."""

    epoch: int = 0  # the next epoch to run
    step: int = 0  # optimizer steps taken
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=dict)  # the validation metrics of the best epoch
    epochs_since_best: int = 0
    train_time_s: float = 0.0
    train_samples: int = 0
    stopped: bool = False  # training ended before max_epochs (the strategy or early stopping): a resume tests


@dataclass
class FitResult:
    state: TrainState
    test: dict[str, float]
    device: str
    precision: str
    test_examples: int  # the test split's size (`test["n"]` were evaluated: fewer under trainer.max_test_batches)


class StrategyStep(nn.Module):
    """What one training step computes before the backward pass: the strategy's forward, watched by its
    regularizer terms, then its penalties. One module call, so DDP (distributed.wrap_step) averages the
    gradient of everything in the loss, penalties and routing included.

    `params` are the optimizer's parameters; any that live outside the model (a strategy's own
    decision network) are registered here too, so DDP averages their gradients as well.
    """

    def __init__(self, model: nn.Module, strategy: Strategy, forward: Callable, params: Sequence[nn.Parameter]):
        super().__init__()
        self.model = model
        inside = {id(p) for p in model.parameters()}
        self.outside = nn.ParameterList([p for p in params if id(p) not in inside])
        self._strategy, self._forward = strategy, forward

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with self._strategy.observing(self.model):
            logits = self._forward(self.model, batch)
        return logits, self._strategy.penalty(self.model, batch, logits)


class Trainer:
    def __init__(self, model: TransferModel, strategy: Strategy, train_loader, val_loader, test_loader,
                 cfg: DictConfig, run_dir: Path, tracker: Optional[Tracker] = None, clock: Optional[Stopwatch] = None):
        self.cfg = cfg
        self.tracker = tracker or Tracker()  # TensorBoard / MLflow get each metrics.jsonl record too
        self.clock = clock or Stopwatch()  # seconds spent in setup, training, validation and test
        self.tcfg = cfg.trainer
        self.val_every = val_every(self.tcfg.get("val_every", 1))
        self.model = model
        self.strategy = strategy
        self.train_loader, self.val_loader, self.test_loader = train_loader, val_loader, test_loader
        self.run_dir = Path(run_dir)
        self.checkpoints = Checkpoints(self.run_dir)
        self.metrics_path = RunFolder(self.run_dir).metrics_file
        self.device = resolve_device(str(self.tcfg.device))
        self.precision = resolve_precision(str(self.tcfg.precision), self.device)
        self.channels_last = use_channels_last(self.tcfg.channels_last, self.device, model.modality)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._count_steps()
        self.main = distributed.is_main()  # the process that writes files (the only one without torchrun)
        # read once: a DictConfig lookup costs tens of microseconds, too much to repeat every step
        self.sched = OmegaConf.to_container(cfg.sched, resolve=True)
        self.grad_clip = self.tcfg.grad_clip
        self.log_every = int(self.tcfg.log_every)
        self.select_by = check_select_by(str(self.tcfg.select_by))
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.mid_epoch = MidEpoch(self.tcfg.get("checkpoint_every"))  # last.pt inside an epoch too
        self.stops = StopRequests(self.run_dir)  # SIGTERM, SIGINT, SIGUSR1: stop after the step, with last.pt

    # ---------------------------------------------------------------------------------------------
    def fit(self) -> FitResult:
        with self.stops:
            return self._fit()

    def _fit(self) -> FitResult:
        self.prepare()
        state, carried_optimizer_state = self._start_or_resume()
        self.tracker.start(self.cfg, finished=read_jsonl(self.metrics_path))
        max_epochs = int(self.tcfg.max_epochs)
        for epoch in range(state.epoch, state.epoch if state.stopped else max_epochs):
            self.begin_epoch(epoch, carried_optimizer_state)
            started = time.perf_counter()
            train = self._train_epoch(epoch, state)
            train_time = time.perf_counter() - started
            self.clock.add("train", train_time)
            val = self._validate() if validates(epoch, self.val_every, max_epochs) else None
            stop = self.strategy.on_epoch_end(epoch, self.model, val)
            if stop and val is None:  # the last epoch is always validated
                val = self._validate()

            state.epoch = epoch + 1
            state.train_time_s += train_time
            state.train_samples += train.pop("samples")
            improved = val is not None and self._track_best(state, epoch, val)
            record = {
                "epoch": epoch,
                "step": state.step,
                "trainable_groups": self.model.trainable_group_names(),
                "lr": group_learning_rates(self.optimizer),
                **{f"train_{k}": v for k, v in train.items()},
                **self.strategy.epoch_stats(),
                **({f"val_{k}": v for k, v in scalars(val).items()} if val else {}),
                "best": improved,
                "epoch_time_s": train_time,
            }
            patience = self.tcfg.early_stopping_patience
            state.stopped = bool(stop or (patience is not None and state.epochs_since_best >= int(patience)))
            if self.main:
                append_jsonl(self.metrics_path, record)
                self._save_checkpoint(state)  # after the metrics line: a resume drops lines past the checkpoint
                self.tracker.log_metrics(epoch, record)  # after the checkpoint: a resume replays what it lacks
            if self.stops.requested:
                self.stops.stop(f"after epoch {epoch}")
            if state.stopped:
                break

        if state.best_epoch >= 0:
            distributed.barrier()  # rank 0 has written best.pt
            self.checkpoints.load_best_into(self.model)
        with self.clock.phase("test"):
            test = self._evaluate(self.test_loader, self.tcfg.max_test_batches, detailed=True)
        examples = getattr(self.test_loader, "num_samples", test["n"])
        return FitResult(state, test, str(self.device), self.precision, examples)

    def prepare(self) -> None:
        """Everything before the first epoch: device, memory format, the strategy's setup, its loaders."""
        if self.tcfg.num_threads:
            torch.set_num_threads(int(self.tcfg.num_threads))
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = bool(self.tcfg.cudnn_benchmark)
        self._saved = self.checkpoints.load_last()  # read once; _start_or_resume restores the rest from it
        if self._saved is not None:
            if not self.tcfg.resume:  # before the setup, which may be costly (DELTA's attention, pruning)
                raise TransferCliError(
                    f"{self.run_dir} already holds a run; add trainer.resume=true to continue it, "
                    "or write to a new folder (hydra.run.dir=...)"
                )
            self.strategy.load_state_dict(self._saved["strategy"])  # it shapes setup (a pruned structure)
        note = self.strategy.plan(self.model, int(self.tcfg.max_epochs))
        if note and self.main:
            print(f"transfer-cli: note: {note}", file=sys.stderr)
        with self.clock.phase("setup"):
            self.strategy.setup(self.model, self.train_loader, self.device)
        if distributed.place().world_size > 1:  # after the setup, which sees every example in every process
            distributed.shard((self.train_loader, self.val_loader, self.test_loader), self.train_loader)
            self._count_steps()
        self.train_loader, self.val_loader, self.test_loader = (
            self.strategy.wrap_loader(split, loader) for split, loader in
            (("train", self.train_loader), ("val", self.val_loader), ("test", self.test_loader)))
        self.forward = torch.compile(self.strategy.forward) if self.tcfg.compile else self.strategy.forward

    # ---------------------------------------------------------------------------------------------
    def _start_or_resume(self) -> tuple[TrainState, dict]:
        saved, self._saved = self._saved, None
        if saved is None:
            if self.main and self.metrics_path.exists():
                self.metrics_path.unlink()  # a run that died before its first checkpoint starts over
            return TrainState(), {}
        self.model.load_state_dict(saved["model"])  # the strategy's state went in before its setup
        self.scaler.load_state_dict(saved["scaler"])
        set_rng_state(saved["rng"])
        self.mid_epoch.resume_from(saved)
        state = TrainState(**saved["train_state"])
        # epochs after the checkpoint were not finished: drop their lines
        kept = [r for r in read_jsonl(self.metrics_path) if r["epoch"] < state.epoch]
        if self.main:
            write_jsonl(self.metrics_path, kept)
        return state, saved["optimizer"]

    def begin_epoch(self, epoch: int, carried_optimizer_state: Optional[dict] = None) -> None:
        """Let the strategy change what trains, and (re)build the optimizer when it did or none exists yet,
        carrying the optimizer state of parameters that keep training (by name)."""
        rebuild = self.strategy.on_epoch_start(epoch, self.model)
        if self.optimizer is not None and not rebuild:
            return
        carried = state_by_name(self.optimizer, self.model) if self.optimizer else (carried_optimizer_state or {})
        groups = self.strategy.param_groups(self.model, float(self.cfg.optim.lr))
        if not groups:
            raise TransferCliError("nothing to train: the strategy froze every layer group, the head included")
        self.optimizer = build_optimizer(groups, self.cfg.optim)
        load_state_by_name(self.optimizer, self.model, carried)
        self.trainable = [p for g in groups for p in g["params"]]
        self.step_module = distributed.wrap_step(StrategyStep(self.model, self.strategy, self.forward, self.trainable),
                                                 self.device)

    def _train_epoch(self, epoch: int, state: TrainState) -> dict[str, Any]:
        self.model.train()
        self.train_loader.set_epoch(epoch)
        solved = self.strategy.fit_epoch(epoch, self.model)  # a strategy with its own solver (L-BFGS probe)
        if solved is not None:
            return solved
        tally = self.mid_epoch.tally(epoch, self.device)  # a resume in the middle of the epoch: its sums so far
        started = time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=tally.batches, desc=f"epoch {epoch}", leave=False,
                   disable=not self._progress())
        for i, batch in self.mid_epoch.batches(self.train_loader, self.steps_per_epoch, tally):
            batch, logits, total, penalties = self.train_step(batch, state)
            tally.add(total, penalties, logits, batch["labels"])
            if (i + 1) % self.log_every == 0 or i + 1 == self.steps_per_epoch:
                self._check_finite(tally.losses[tally.checked:], epoch, state.step)  # the steps since the last check
                tally.checked = len(tally.losses)
                if not bar.disable:  # .item() waits for the device: only for a bar someone sees
                    bar.set_postfix(loss=f"{tally.losses[-1].item():.4f}",
                                    samples_per_s=f"{tally.samples / (time.perf_counter() - started):.0f}")
            bar.update()
            inside = i + 1 < self.steps_per_epoch  # after the last batch, the epoch's own checkpoint follows
            if self.main and inside and (self.stops.requested or self.mid_epoch.due(state.step)):
                self._save_checkpoint(state, self.mid_epoch.state(epoch, tally))
            if inside and self.stops.requested:
                self.stops.stop(f"at step {state.step} (epoch {epoch}, batch {i + 1} of {self.steps_per_epoch})")
        bar.close()
        elapsed = time.perf_counter() - started
        # over every process (data-parallel training): sums, then means
        totals = distributed.sum_over_processes({
            "loss": torch.stack(tally.losses).sum() if tally.losses else 0.0, "steps": len(tally.losses),
            "correct": tally.correct, "samples": tally.samples,
            **{f"penalty/{k}": v for k, v in tally.penalty_sums.items()}}, self.device)
        steps, samples = totals.pop("steps"), int(totals.pop("samples"))
        return {
            "loss": totals.pop("loss") / steps if steps else float("nan"),
            "acc1": totals.pop("correct") / max(samples, 1),
            **{k: v / max(steps, 1) for k, v in totals.items()},
            "samples_per_s": samples / elapsed if elapsed > 0 else 0.0,
            "samples": samples,
        }

    def train_step(self, batch: dict, state: TrainState) -> tuple:
        """One optimizer step on one batch (benchmarks time exactly this); returns the batch on the
        device, the logits, the total loss and the penalty terms."""
        optimizer = self.optimizer
        set_learning_rates(optimizer, lr_factor(state.step, self.total_steps, self.steps_per_epoch, self.sched))
        batch = to_device(batch, self.device, self.channels_last)
        with autocast(self.device, self.precision):
            logits, penalties = self.step_module(batch)  # strategy forward + penalties (DDP-wrapped: averaged)
            loss = F.cross_entropy(logits.float(), batch["labels"])
            total = loss + sum(penalties.values()) if penalties else loss
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.grad_clip:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(self.trainable, float(self.grad_clip))
        self.scaler.step(optimizer)
        self.scaler.update()
        state.step += 1
        self.strategy.on_step_end(self.model, batch, optimizer)
        return batch, logits, total, penalties

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

    def _evaluate(self, loader, max_batches: Optional[int], detailed: bool = False) -> dict[str, Any]:
        """The metrics (engine/metrics.py) over the split, or its first `max_batches` (each process evaluates
        its shard; the sums are added); `detailed`: also calibration and the confusion matrix."""
        counts = tally(self.model, self.strategy, loader, self.device, self.precision, max_batches, detailed)
        return distributed.merge_evaluation(counts, self.device).metrics()

    def _validate(self) -> dict[str, float]:
        started = time.perf_counter()
        val = self._evaluate(self.val_loader, self.tcfg.max_val_batches)
        val["time_s"] = time.perf_counter() - started
        self.clock.add("val", val["time_s"])
        return val

    def _track_best(self, state: TrainState, epoch: int, val: dict[str, float]) -> bool:
        """Best epoch = the best validation `trainer.select_by` (default acc1), ties broken by lower loss."""
        better = selection_key(val, self.select_by) > selection_key(state.best_val, self.select_by)
        if better:
            state.best_epoch, state.best_val = epoch, {k: v for k, v in scalars(val).items() if k != "time_s"}
            state.epochs_since_best = 0
            if self.main:
                self.checkpoints.save_best(self.model, epoch)
        else:
            state.epochs_since_best += 1
        return better

    def _save_checkpoint(self, state: TrainState, mid_epoch: Optional[dict] = None) -> None:
        self.checkpoints.save_last({
            **({"mid_epoch": mid_epoch} if mid_epoch else {}),
            "model": self.model.state_dict(),
            "optimizer": state_by_name(self.optimizer, self.model),
            "scaler": self.scaler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng": rng_state(),
            "train_state": asdict(state),
        })

    def _count_steps(self) -> None:
        batches = len(self.train_loader)
        self.steps_per_epoch = min(batches, self.tcfg.max_train_batches or batches)
        self.total_steps = int(self.tcfg.max_epochs) * self.steps_per_epoch

    def _progress(self) -> bool:
        setting = self.tcfg.progress
        return sys.stderr.isatty() if setting == "auto" else bool(setting)

