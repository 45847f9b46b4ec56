"""`scenario=class_incremental`: stages orchestrated above the one training loop.

Each stage is a `Trainer.fit` on that stage's classes, in its own folder (`<run>/stage_<k>/`, with the
loop's own metrics.jsonl and checkpoints), with the head grown to every class seen; the strategy's stage
hooks (`strategies/continual/stage_hooks.py`) run around it; then the model (through the strategy's
forward, no task id) is tested on the test examples of every class seen so far. Within a stage the loop
validates only the last epoch, on the stage's own classes, so the model a stage ends with is its last
epoch's (as LAMDA-PILOT, which has no validation); the loop's own test is skipped, the scenario tests.

Resume: a finished stage leaves stage.json and end.pt; a resumed run restores the latest end.pt and
continues with the next stage, whose fit resumes from its own checkpoints/last.pt (killed in stage 3,
epoch 2, it continues there). Each stage starts from a seed of its own, so a resumed run ends with the
numbers of an uninterrupted one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer_cli.backbones import build_backbone
from transfer_cli.continual.evaluation import predict
from transfer_cli.continual.metrics import stage_accuracies, summarize
from transfer_cli.continual.split import Stage, class_order, labels_in, plan_stages, reorder
from transfer_cli.data import build_data, make_loader
from transfer_cli.engine import distributed
from transfer_cli.engine.device import resolve_device, resolve_precision
from transfer_cli.engine.loop import Trainer
from transfer_cli.engine.results import parameter_counts
from transfer_cli.engine.seeding import seed_everything
from transfer_cli.engine.timing import Stopwatch, time_section
from transfer_cli.errors import TransferCliError
from transfer_cli.io import load_torch, save_torch, write_json
from transfer_cli.run_folder import RunFolder
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.continual.stage_hooks import grow_head, stage_hooks, training_strategy

#: strategies whose setup builds per-run structures (routing's frozen copies, pruning) that one fit per stage
#: would rebuild from the previous stage's weights: refused rather than run in a way no paper describes
REFUSED = {"spottune": "routing", "adafilter": "routing", "transtailor": "pruning"}


class Scenario:
    def __init__(self, cfg: DictConfig, run_dir: Path):
        check_scenario(cfg)
        self.cfg, self.folder, self.seed = cfg, RunFolder(run_dir), int(cfg.seed)
        self.clock = Stopwatch()
        seed_everything(self.seed)
        with self.clock.phase("data"):
            data = build_data(cfg.data, seed=self.seed)
        self.order = class_order(data.num_classes, int(cfg.scenario.class_order_seed))
        self.data = reorder(data, self.order)
        self.stages = plan_stages(data.num_classes, int(cfg.scenario.init_cls), int(cfg.scenario.increment))
        self.strategy = build_strategy(cfg)
        seed_everything(self.seed)
        with self.clock.phase("model"):
            self.model = build_backbone(cfg.backbone, self.stages[0].end, pretrained=self.strategy.pretrained_body)
        self.device = resolve_device(str(cfg.trainer.device))
        self.precision = resolve_precision(str(cfg.trainer.precision), self.device)
        self.model.to(self.device)
        self.hooks = stage_hooks(self.strategy)
        self.trained = False  # whether a stage (of this process) ran the loop
        for hook in self.hooks:
            hook.begin_scenario(self.model)

    def run(self) -> dict[str, Any]:
        records = self._finished()
        if records:
            self._restore(self.stages[len(records) - 1])
        for stage in self.stages[len(records):]:
            records.append(self._run_stage(stage))
        return self._results(records)

    # ---------------------------------------------------------------------------------------------
    def _finished(self) -> list[dict]:
        """The records of the stages a killed run finished (a resume continues after them)."""
        records = []
        for stage in self.stages:
            path = self.folder.stage_record(stage.index)
            if not path.exists():
                break
            records.append(load_record(path))
        if (records or self.folder.stage_dir(0).exists()) and not self.cfg.trainer.resume:
            raise TransferCliError(f"{self.folder.path} already holds a run; add trainer.resume=true to continue it, "
                                   "or write to a new folder (hydra.run.dir=...)")
        return records

    def _restore(self, stage: Stage) -> None:
        """The model and the strategy's state as `stage` left them; the structure a training strategy adds in
        its setup (PEFT's adapters) is rebuilt first, so the saved weights fit."""
        saved = load_torch(self.folder.stage_end(stage.index))
        grow_head(self.model, stage.end)
        self.strategy.load_state_dict(saved["strategy"])
        trained = next((training_strategy(self.strategy, s.index) for s in self.stages[:stage.index + 1]
                        if training_strategy(self.strategy, s.index) is not None), None)
        if trained is not None and self._epochs():
            trained.setup(self.model, self._loader(stage, "fixed"), self.device)
        self.model.load_state_dict(saved["model"])

    def _run_stage(self, stage: Stage) -> dict[str, Any]:
        seed_everything(self.seed * 1000 + stage.index)  # the same start whether or not the run was resumed
        for hook in self.hooks:
            hook.before_stage(stage.index, self.model)
        grow_head(self.model, stage.end)
        stage_dir = self.folder.stage_dir(stage.index)
        stage_dir.mkdir(parents=True, exist_ok=True)
        trains = training_strategy(self.strategy, stage.index)
        started = time.perf_counter()
        if trains is not None and self._epochs():
            self.trained = True
            Trainer(self.model, trains, self._loader(stage, "train"), self._loader(stage, "val"),
                    self._loader(stage, "test"), self._stage_cfg(), stage_dir, clock=self.clock).fit()
        fixed = self._loader(stage, "fixed")
        with self.clock.phase("setup"):
            for hook in self.hooks:
                hook.after_stage(stage.index, self.model, fixed, self.device)
        with self.clock.phase("test"):
            predictions, labels, loss = predict(self.model, self.strategy, self._loader(stage, "test"), self.device,
                                          self.precision, self.cfg.trainer.max_test_batches)
        record = {"stage": stage.index, "classes": [stage.start, stage.end],
                  **stage_accuracies(predictions, labels, self.stages, stage.index), "loss": loss,
                  "time_s": time.perf_counter() - started}
        save_torch(self.folder.stage_end(stage.index), {"model": self.model.state_dict(),
                                                        "strategy": self.strategy.state_dict()})
        write_json(self.folder.stage_record(stage.index), record)
        self._drop_stale(stage)
        print(f"stage {stage.index}: classes {stage.start}-{stage.end - 1}, acc1 {record['acc1']:.4f} on "
              f"{record['n']} test examples of {stage.end} classes")
        return record

    def _drop_stale(self, stage: Stage) -> None:
        """Keep the disk small: the finished stage's own checkpoints and the previous stage's end.pt are
        no longer needed once this stage's end.pt and stage.json are written."""
        folder = RunFolder(self.folder.stage_dir(stage.index))
        for path in (folder.last_checkpoint, folder.best_checkpoint,
                     *([self.folder.stage_end(stage.index - 1)] if stage.index else [])):
            path.unlink(missing_ok=True)

    def _loader(self, stage: Stage, role: str):
        """train: the stage's classes, shuffled (augmented when asked); val: the stage's classes; test: every
        class seen so far; fixed: the stage's training examples in order, unaugmented (for the stage hooks)."""
        split = {"train": self.data.train, "fixed": self.data.train, "val": self.data.val, "test": self.data.test}[role]
        start = 0 if role == "test" else stage.start
        batch = self.cfg.trainer.batch_size if role == "train" else self.cfg.trainer.eval_batch_size
        return make_loader(labels_in(split, start, stage.end), self.model, int(batch), train=role == "train",
                           seed=self.seed, num_workers=int(self.cfg.data.num_workers),
                           augment=bool(self.cfg.data.augment), max_length=int(self.cfg.data.get("max_length", 128)),
                           skip_bad_images=bool(self.cfg.data.get("skip_bad_images", False)))

    def _stage_cfg(self) -> DictConfig:
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        with open_dict(cfg):
            cfg.trainer.val_every = self._epochs()  # only the last epoch: the stage ends with its last weights
            cfg.trainer.max_test_batches = 0  # the scenario tests on every class seen, after the stage hooks
        return cfg

    def _epochs(self) -> int:
        return int(self.cfg.trainer.max_epochs)

    def _results(self, records: list[dict]) -> dict[str, Any]:
        summary = summarize(records)
        last = records[-1]
        return {
            "config": {"strategy": self.cfg.strategy.name, "backbone": self.cfg.backbone.name,
                       "data": self.cfg.data.name, "seed": self.cfg.seed, "scenario": self.cfg.scenario.name,
                       "samples_per_class": self.cfg.data.get("samples_per_class"),
                       "num_classes": self.data.num_classes},
            "full_config": OmegaConf.to_container(self.cfg, resolve=True),
            "weights": getattr(self.model, "weights_origin", {"source": "unknown"}),
            "continual": {"class_order": self.order, "class_names": list(self.data.class_names),
                          "stages": records, **summary},
            # the final stage's test on every class, so tables and sweeps read a scenario like any run
            "test": {"acc1": last["acc1"], "loss": last["loss"], "n": last["n"], "of": len(self.data.test.labels)},
            # no validation number stands for a scenario (each stage validates its own classes only), so a
            # sweeper's objective (trainer.select_by) reads NaN rather than a number that selects on plasticity
            "val": {},
            "best_epoch": self._epochs() - 1 if self.trained else -1,  # each stage keeps its last epoch
            "epochs": self._epochs(),
            "params": parameter_counts(self.model),
            "train_time_s": self.clock.seconds.get("train", 0.0),
            "time": time_section(self.clock.seconds, self.clock.wall()),
            **self.strategy.results(),
        }


def check_scenario(cfg: DictConfig) -> None:
    """One line for what a class-incremental run cannot do."""
    reason = REFUSED.get(str(cfg.strategy.name))
    if reason:
        raise TransferCliError(f"strategy={cfg.strategy.name} cannot run in scenario=class_incremental: its {reason} "
                               "structure is built for one fit; use finetune, l2sp, freeze, a PEFT strategy, "
                               "simplecil, aper, ewc or cil_lwf")
    cache = cfg.strategy.get("cache_features", False)
    if cache is not False:
        raise TransferCliError(f"strategy.cache_features={cache} keeps one fit's frozen features, but each stage trains on "
                               "other examples; in scenario=class_incremental set strategy.cache_features=false")
    if distributed.place().world_size > 1:
        raise TransferCliError("scenario=class_incremental runs in one process; start it without torchrun")
    if str(cfg.logger.get("name", "none")) != "none":
        raise TransferCliError("scenario=class_incremental writes no tracker yet; set logger=none "
                               "(each stage's metrics.jsonl and results.json hold the numbers)")


def load_record(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def run_scenario(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run every stage (or the ones a killed run did not finish) and write results.json."""
    results = Scenario(cfg, run_dir).run()
    write_json(RunFolder(run_dir).results_file, results)
    return results
