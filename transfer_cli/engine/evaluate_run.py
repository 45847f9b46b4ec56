"""Work on a finished run's folder: re-evaluate its best checkpoint, or export its trained body."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from transfer_cli.backbones.export import export_body
from transfer_cli.engine.checkpoint import Checkpoints
from transfer_cli.engine.device import resolve_device, resolve_precision
from transfer_cli.engine.evaluate import evaluate
from transfer_cli.engine.run import Assembled, assemble
from transfer_cli.errors import TransferCliError
from transfer_cli.io import write_json
from transfer_cli.run_folder import RunFolder


def restore_run(cfg: DictConfig, run_dir: Path) -> tuple[Assembled, int, Any]:
    """Rebuild a finished run with its best weights (for eval, export, analysis); returns the run, the
    epoch of those weights and the device."""
    checkpoints = Checkpoints(run_dir)
    if not checkpoints.best.exists():
        raise TransferCliError(f"{run_dir} has no checkpoints/best.pt; did the run finish an epoch?")
    run = assemble(cfg)
    device = resolve_device(str(cfg.trainer.device))
    run.model.to(device)
    last = checkpoints.load_last()
    if last is not None:  # the strategy's final state (a pruned structure) shapes setup
        run.strategy.load_state_dict(last["strategy"])
    run.strategy.setup(run.model, run.loaders["train"], device)  # structure the saved weights assume
    epoch = checkpoints.load_best_into(run.model)
    return run, epoch, device


def evaluate_run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Evaluate the run's selected weights on its test split; write eval.json beside results.json."""
    run, epoch, device = restore_run(cfg, run_dir)
    precision = resolve_precision(str(cfg.trainer.precision), device)
    cap = cfg.trainer.get("max_test_batches", cfg.trainer.get("max_eval_batches"))  # the name before trainer.max_test_batches
    test = evaluate(run.model, run.strategy, run.loaders["test"], device, precision, cap, detailed=True)
    # as results.json: n of the split's `of` examples were tested
    result = {"test": {**test, "of": getattr(run.loaders["test"], "num_samples", test["n"])}, "epoch": epoch}
    write_json(RunFolder(run_dir).eval_file, result)
    return result


def export_run(cfg: DictConfig, run_dir: Path, out: Path, native: bool = False) -> None:
    """Save the run's trained body, with its preprocessing, as a backbone for `backbone.weights=`, or with
    `native` the whole classifier as its library's own folder (backbones/native_export.py); say on stderr
    when that is not the whole trained model (the strategy's `export_caveat`)."""
    run, epoch, _ = restore_run(cfg, run_dir)
    if run.strategy.export_caveat:
        print(f"transfer-cli: note: strategy={cfg.strategy.name}: {run.strategy.export_caveat}", file=sys.stderr)
    model = run.strategy.export_model(run.model).cpu()
    if native:
        from transfer_cli.backbones.native_export import export_native

        export_native(model, out, class_names(run_dir, run.data.class_names, run.model.head.out_features))
        return
    export_body(model, out, {"source_run": str(run_dir), "source_epoch": str(epoch),
                             "source_classes": ",".join(run.data.class_names)})


def class_names(run_dir: Path, rebuilt: Sequence[str], outputs: int) -> list[str]:
    """The names of the head's outputs: as results.json recorded them, else as the data gives them now."""
    results = RunFolder(run_dir).read_results() or {}
    names = list(results.get("class_names") or rebuilt)
    if len(names) != outputs:
        raise TransferCliError(f"the run's head has {outputs} outputs but {len(names)} class names were found; "
                               "the data has changed since the run trained: restore it or retrain")
    return names
