"""One run, assembled from its config: data -> model -> strategy -> loaders -> loop -> results."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from transfer_cli.backbones import build_backbone
from transfer_cli.backbones.model import TransferModel
from transfer_cli.data import build_data, make_loader
from transfer_cli.data.splits import DataBundle
from transfer_cli.engine import distributed
from transfer_cli.engine.loop import Trainer
from transfer_cli.engine.results import build_results
from transfer_cli.engine.seeding import seed_everything
from transfer_cli.engine.timing import Stopwatch, time_section
from transfer_cli.errors import TransferCliError
from transfer_cli.io import write_json
from transfer_cli.reporting.trackers import Tracker, open_tracker
from transfer_cli.run_folder import RunFolder
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.base import Strategy
from transfer_cli.strategies.continual.stage_hooks import outside_a_scenario


@dataclass
class Assembled:
    data: DataBundle
    model: TransferModel
    strategy: Strategy
    loaders: dict[str, Any]


def assemble(cfg: DictConfig, clock: Optional[Stopwatch] = None) -> Assembled:
    """Build everything a run needs, seeded, in an order that keeps model init independent of data code;
    `clock` gets the time spent on the data (`data`) and the model (`model`)."""
    clock = clock or Stopwatch()
    seed_everything(int(cfg.seed))
    with clock.phase("data"):
        data = build_data(cfg.data, seed=int(cfg.seed))
    strategy = build_strategy(cfg)
    refusal = outside_a_scenario(strategy)
    if refusal:
        raise TransferCliError(refusal)
    seed_everything(int(cfg.seed))
    with clock.phase("model"):
        model = build_backbone(cfg.backbone, data.num_classes, pretrained=strategy.pretrained_body)
    common = dict(seed=int(cfg.seed), num_workers=int(cfg.data.num_workers),
                  augment=bool(cfg.data.augment), max_length=int(cfg.data.get("max_length", 128)),
                  skip_bad_images=bool(cfg.data.get("skip_bad_images", False)))
    with clock.phase("data"):
        loaders = {
            "train": make_loader(data.train, model, int(cfg.trainer.batch_size), train=True, **common),
            "val": make_loader(data.val, model, int(cfg.trainer.eval_batch_size), train=False, **common),
            "test": make_loader(data.test, model, int(cfg.trainer.eval_batch_size), train=False, **common),
        }
    return Assembled(data, model, strategy, loaders)


def skipped_images(loaders: dict[str, Any]) -> dict[str, Any]:
    """results.json's count of the image files data.skip_bad_images left out, per split (none: nothing)."""
    skipped = {split: sorted(getattr(loader, "skipped", {})) for split, loader in loaders.items()}
    if not any(skipped.values()):
        return {}
    return {"skipped_images": {"count": sum(len(paths) for paths in skipped.values()), **skipped}}


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, select the best epoch on validation, test it, and write results.json (a class-incremental
    scenario: every stage, `continual/scenario.py`)."""
    if cfg.get("scenario") is not None:
        from transfer_cli.continual.scenario import run_scenario  # the scenario builds its runs from this module's parts

        return run_scenario(cfg, run_dir)
    # data-parallel (torchrun): only rank 0 logs and writes; the others train and evaluate their shares
    tracking = open_tracker(cfg, run_dir) if distributed.is_main() else nullcontext(Tracker())
    clock = Stopwatch()
    with tracking as tracker:  # first: a logger's missing package fails before any work
        run = assemble(cfg, clock)
        trainer = Trainer(run.model, run.strategy, run.loaders["train"], run.loaders["val"], run.loaders["test"],
                          cfg, run_dir, tracker, clock)
        fit = trainer.fit()
        results = {**build_results(cfg, fit, run.model, run.data.class_names), **run.strategy.results(),
                   **distributed.describe(int(cfg.trainer.batch_size)), **skipped_images(run.loaders),
                   "time": time_section(clock.seconds, clock.wall())}
        if distributed.is_main():
            write_json(RunFolder(run_dir).results_file, results)
            if cfg.trainer.confusion_png and results["test"].get("confusion"):
                from transfer_cli.reporting.confusion import write_confusion_png  # matplotlib: only when drawn

                write_confusion_png(RunFolder(run_dir).confusion_png, results["test"]["confusion"], results["class_names"])
        tracker.log_final(results)
    return results
