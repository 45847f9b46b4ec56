"""The numbers of a class-incremental run, from the predictions after each stage.

The accuracy matrix has a row per stage and a column per task (a stage's block of classes): entry
[s][t] is the top-1 on task t's test examples after stage s, predicted over every class seen by then
(one head, no task id); tasks not yet met are None. From it, as LAMDA-PILOT computes them:
Ā (average incremental accuracy) = mean over stages of the top-1 on all seen classes; last = the final
stage's; forgetting = mean over the tasks before the last of (the best accuracy the task ever had − its
final accuracy).
"""
from __future__ import annotations

from statistics import fmean
from typing import Any, Optional, Sequence

import torch

from transfer_cli.continual.split import Stage


def stage_accuracies(predictions: torch.Tensor, labels: torch.Tensor, stages: Sequence[Stage],
                     current: int) -> dict[str, Any]:
    """After stage `current`: top-1 over all test examples seen so far, per task, and on old vs new classes."""
    hit = predictions == labels

    def accuracy(start: int, end: int) -> Optional[float]:
        chosen = (labels >= start) & (labels < end)
        return int(hit[chosen].sum()) / int(chosen.sum()) if bool(chosen.any()) else None

    now = stages[current]
    return {"acc1": accuracy(0, now.end), "n": int(labels.numel()),
            "tasks": [accuracy(s.start, s.end) for s in stages[:current + 1]],
            "old_acc1": accuracy(0, now.start) if current else None, "new_acc1": accuracy(now.start, now.end)}


def summarize(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The scenario's summary from each stage's `stage_accuracies`, in stage order."""
    tasks = len(records)
    matrix = [list(r["tasks"]) + [None] * (tasks - len(r["tasks"])) for r in records]
    curve = [r["acc1"] for r in records]
    return {"accuracy_matrix": matrix, "acc1_per_stage": curve, "avg_incremental_acc1": fmean(curve),
            "last_acc1": curve[-1], "forgetting": forgetting(matrix)}


def forgetting(matrix: Sequence[Sequence[Optional[float]]]) -> Optional[float]:
    """Mean over tasks 0..T-2 of (max over stages of the task's accuracy − its accuracy after the last stage);
    None for a single-stage run, which has no old task. A task's missing accuracy (no test example) is skipped."""
    last = len(matrix) - 1
    drops = []
    for task in range(last):
        seen = [row[task] for row in matrix if row[task] is not None]
        if seen and matrix[last][task] is not None:
            drops.append(max(seen) - matrix[last][task])
    return fmean(drops) if drops else None
