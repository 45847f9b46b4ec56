"""The report of class-incremental runs (scenario=class_incremental): average incremental accuracy Ā, last
accuracy and forgetting as mean ± sample std over seeds, and accuracy against the number of classes seen,
one line per group (as LAMDA-PILOT's figures). Runs without a `continual` section are left out."""
from __future__ import annotations

import statistics
from typing import Optional, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transfer_cli.analysis.output import markdown_table
from transfer_cli.reporting.runs import Run
from transfer_cli.reporting.table import build_table

#: the summary numbers, in results.json's `continual` section, and their column names
COLUMNS = {"avg_incremental_acc1": "Ā (%)", "last_acc1": "last (%)", "forgetting": "forgetting (%)"}


def scenario_runs(runs: Sequence[Run]) -> list[Run]:
    return [r for r in runs if r.status == "done" and "continual" in r.results]


def continual_table(runs: Sequence[Run], keys: Sequence[str]) -> Optional[str]:
    """Markdown: per group, each summary number as mean ± std (%) and its per-seed values; None without scenarios."""
    done = [r for r in scenario_runs(runs) if r.results["continual"].get("forgetting") is not None]
    if not done:
        return None
    tables = {name: build_table(done, keys, f"continual.{name}") for name in COLUMNS}
    rows = []
    for i, group in enumerate(tables["last_acc1"]):
        cells = [_cell(tables[name][i].scores) for name in COLUMNS]
        seeds = ", ".join(str(s) for s in group.seeds)
        rows.append([*("-" if v is None else str(v) for v in group.values), *cells, seeds])
    return markdown_table([*keys, *COLUMNS.values(), "seeds"], rows)


def _cell(scores: Sequence[float]) -> str:
    mean = 100 * statistics.fmean(scores)
    spread = f" ± {100 * statistics.stdev(scores):.1f}" if len(scores) > 1 else ""
    return f"{mean:.1f}{spread} ({', '.join(f'{100 * s:.1f}' for s in scores)})"


def accuracy_curve(runs: Sequence[Run], keys: Sequence[str]) -> Optional[Figure]:
    """Top-1 on every class seen after each stage, against the number of classes seen: the mean over a
    group's seeds, its sample std as a band."""
    done = scenario_runs(runs)
    if not done:
        return None
    fig = Figure(figsize=(6.0, 4.2), layout="constrained")
    ax = fig.subplots()
    groups: dict[tuple, list[Run]] = {}
    for run in done:
        groups.setdefault(tuple(run.config.get(k) for k in keys), []).append(run)
    for values, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        curves = [[s["acc1"] for s in r.results["continual"]["stages"]] for r in members]
        seen = [s["classes"][1] for s in members[0].results["continual"]["stages"]]
        length = min(map(len, curves))
        mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(length)]
        std = [100 * statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(length)]
        label = ", ".join("-" if v is None else str(v) for v in values) or "all runs"
        line, = ax.plot(seen[:length], mean, marker="o", label=label)
        ax.fill_between(seen[:length], [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("number of classes seen")
    ax.set_ylabel("top-1 on all classes seen (%)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title=", ".join(k.removesuffix(".name") for k in keys) or None, fontsize="small")
    ax.set_title("Class-incremental accuracy (mean over seeds, band: ± std)", fontsize="medium")
    return fig
