"""The report's table as text: markdown for people (accuracies in %), CSV in full precision, and one
line per run that failed or did not finish.
"""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from transfer_cli.analysis.output import markdown_table
from transfer_cli.reporting.runs import Run
from transfer_cli.reporting.table import Group, in_percent


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


COUNT_HEADERS = ["n", "failed", "unfinished", "best epoch", "train time (s)", "trainable params", "trainable %"]


def markdown(table: Sequence[Group], keys: Sequence[str], metric: str) -> str:
    scale, unit, digits, std_digits = ((100.0, " (%)", ".1f", ".1f") if in_percent(metric)
                                       else (1.0, "", ".4g", ".2g"))

    def score(group: Group) -> str:
        if not group.n:
            return "-"
        text = f"{scale * group.mean:{digits}}"
        return text if group.n < 2 else f"{text} ± {scale * group.std:{std_digits}}"

    def number(values: Sequence[float], fmt: str) -> str:
        return f"{_mean(values):{fmt}}" if values else "-"

    # trainable %: three significant digits, since PEFT shares are fractions of a percent (0.0712)
    rows = [[*(_cell(v) for v in g.values), score(g), g.n, g.failed, g.unfinished, number(g.best_epochs, ".1f"),
             number(g.train_times, ".1f"), number(g.trainable, ",.0f"), number(g.trainable_pcts, ".3g")] for g in table]
    return markdown_table([*keys, f"{metric}{unit}", *COUNT_HEADERS], rows)


def csv_text(table: Sequence[Group], keys: Sequence[str], metric: str) -> str:
    """The table in full precision, metric as in results.json (fractions, not %); empty = not available."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*keys, f"{metric}_mean", f"{metric}_std", "n", "failed", "unfinished", "seeds",
                     "best_epoch_mean", "train_time_s_mean", "params_trainable", "params_trainable_pct"])
    for g in table:
        stats = [g.mean, g.std, g.n, g.failed, g.unfinished, " ".join(str(s) for s in g.seeds),
                 _mean(g.best_epochs), _mean(g.train_times), round(_mean(g.trainable)) if g.n else math.nan,
                 _mean(g.trainable_pcts)]
        writer.writerow([*("" if v is None else v for v in g.values),
                         *("" if isinstance(v, float) and math.isnan(v) else v for v in stats)])
    return out.getvalue()


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def problems(runs: Sequence[Run], keys: Sequence[str], base: Path) -> list[str]:
    """One markdown line per failed, damaged or unfinished run: its folder (relative to `base` when inside it), its
    group and seed, what went wrong."""
    lines = []
    base = base.resolve()
    for run in runs:
        if run.status == "done":
            continue
        where = run.folder.relative_to(base) if run.folder.is_relative_to(base) else run.folder
        what = {"failed": f"failed: {run.error}", "damaged": f"damaged: {run.damaged}"}.get(
            run.status, "unfinished: no results.json (running or killed)")
        group = ", ".join(f"{k}={_cell(run.config.get(k))}" for k in keys)
        lines.append(f"- `{where}` ({group + ', ' if group else ''}seed={run.config.get('seed')}): {what}")
    return lines

