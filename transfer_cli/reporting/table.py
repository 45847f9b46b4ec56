"""The report's numbers: runs grouped by the values of the grouping keys, the metric's mean and sample
standard deviation over each group's done runs (its seeds). Pure functions of the runs, so they can
be tested without files.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

from transfer_cli.errors import TransferCliError
from transfer_cli.reporting.runs import Run, flatten

DEFAULT_METRIC = "test.acc1"


@dataclass
class Group:
    """The runs sharing one value of each grouping key; statistics are over its done runs (its seeds)."""

    values: tuple
    scores: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    train_times: list[float] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)
    trainable_pcts: list[float] = field(default_factory=list)
    failed: int = 0
    unfinished: int = 0

    @property
    def n(self) -> int:
        return len(self.scores)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores) if self.scores else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (n − 1); NaN below two runs."""
        return statistics.stdev(self.scores) if self.n > 1 else math.nan


def metric_value(results: dict, metric: str) -> float:
    node: Any = results
    for part in metric.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        numeric = [k for k, v in flatten({k: v for k, v in results.items() if k != "full_config"}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        raise TransferCliError(f"--metric {metric!r} is not a number in results.json; choose one of: "
                               f"{', '.join(numeric)}")
    return float(node)


def build_table(runs: Sequence[Run], keys: Sequence[str], metric: str = DEFAULT_METRIC) -> list[Group]:
    """One Group per combination of the keys' values that occurs, sorted by those values."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        values = tuple(run.config.get(k) for k in keys)
        group = groups.setdefault(values, Group(values))
        if run.status in ("failed", "damaged"):  # a damaged run's numbers cannot be read: counted with the failed
            group.failed += 1
        elif run.status == "unfinished":
            group.unfinished += 1
        else:
            results = run.results
            try:
                group.scores.append(metric_value(results, metric))
            except TransferCliError as err:
                raise TransferCliError(f"{run.folder}: {err}") from None
            group.seeds.append(run.config.get("seed"))
            group.best_epochs.append(results["best_epoch"])
            group.train_times.append(results["train_time_s"])
            group.trainable.append(results["params"]["trainable"])
            share = trainable_pct(results["params"])
            if share is not None:
                group.trainable_pcts.append(share)
    return sorted(groups.values(), key=lambda g: tuple(sort_key(v) for v in g.values))


def trainable_pct(params: dict) -> float | None:
    """The trainable share (%) from results.json's params; results written before it was recorded give it from
    the counts they hold (the same ratio), and None when they lack the total too."""
    if "trainable_pct" in params:
        return float(params["trainable_pct"])
    total = params.get("total")
    return 100.0 * params["trainable"] / total if total else None


def sort_key(value: Any) -> tuple:
    """Numbers numerically (5 < 10 < 20), then text, then missing values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (2, 0, "") if value is None else (1, 0, str(value))


#: fractions in results.json besides the accuracies (acc1, acc5, ...), also shown in %
PERCENT_METRICS = ("mean_class_acc", "macro_f1", "ece")


def in_percent(metric: str) -> bool:
    """Accuracies (acc1, acc5, mean_class_acc), macro-F1 and ECE are fractions in results.json and shown in %."""
    name = metric.rsplit(".", 1)[-1]
    return name.startswith("acc") or name in PERCENT_METRICS

