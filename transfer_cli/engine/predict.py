"""`transfer-cli predict`: a finished run applied to new inputs, one CSV row per input.

The run is rebuilt the way `eval` rebuilds it (`evaluate_run.restore_run`: its strategy's routing,
pruned structure or added parameters, then the best weights), so each prediction is the model the
run tested, through `strategy.forward`, on the GPU when there is one. Rows hold the input, the
predicted class name and the top-k classes with their softmax probabilities.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig
from tqdm import tqdm

from transfer_cli.data.inputs import Inputs, read_inputs
from transfer_cli.engine.device import autocast, resolve_precision, to_device
from transfer_cli.engine.evaluate_run import class_names, restore_run
from transfer_cli.errors import TransferCliError
from transfer_cli.io import atomic_path
from transfer_cli.run_folder import RunFolder


@dataclass
class Predicted:
    out: Path
    predicted: int
    unreadable: int


def predict_run(cfg: DictConfig, run_dir: Path, source: Path, out: Optional[Path], topk: int = 5,
                column: Optional[str] = None) -> Predicted:
    """Predict every readable input under `source` (texts: from `column`, default the run's data.text_column);
    write the CSV (default <run>/predictions/<input name>.csv)."""
    if topk < 1:
        raise TransferCliError(f"topk={topk} must be at least 1")
    run, _, device = restore_run(cfg, run_dir)
    names = class_names(run_dir, run.data.class_names, run.model.head.out_features)
    inputs = read_inputs(source, run.model, run.data, column or str(cfg.data.get("text_column", "text")),
                         int(cfg.data.get("max_length", 128)), int(cfg.trainer.eval_batch_size))
    k = min(topk, len(names))
    rows = _predict(run.model, run.strategy, inputs, device, resolve_precision(str(cfg.trainer.precision), device), k)
    if not rows and len(inputs.unreadable) == 1:
        bad = inputs.unreadable[0]
        raise TransferCliError(f"cannot read {bad.path} ({bad.reason}); nothing predicted")
    for bad in inputs.unreadable:
        print(f"transfer-cli: skipped {bad.path}: {bad.reason}", file=sys.stderr)
    if not rows:
        raise TransferCliError(f"none of the {len(inputs.unreadable)} input(s) under {source} could be read "
                               "(each is listed above); nothing predicted")
    out = out or RunFolder(run_dir).predictions_dir / f"{source.stem or source.name}.csv"
    header = ["input", "predicted", "top1_prob"] + [c for r in range(2, k + 1) for c in (f"top{r}", f"top{r}_prob")]
    with atomic_path(out) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for name, classes, probabilities in rows:
            writer.writerow([name] + [v for c, p in zip(classes, probabilities) for v in (names[c], f"{p:.6f}")])
    return Predicted(out, len(rows), len(inputs.unreadable))


@torch.no_grad()
def _predict(model, strategy, inputs: Inputs, device: torch.device, precision: str,
             k: int) -> list[tuple[str, list[int], list[float]]]:
    """(input name, top-k class ids, their probabilities) per readable input, in input order."""
    model.eval()
    rows = []
    bar = tqdm(inputs, total=len(inputs), desc="predict", unit="batch",
               disable=len(inputs) <= 1 or not sys.stderr.isatty())
    for names, batch in bar:
        with autocast(device, precision):
            logits = strategy.forward(model, to_device(batch, device))
        top = logits.float().softmax(dim=1).topk(k, dim=1)
        rows += zip(names, top.indices.tolist(), top.values.tolist())
    return rows
