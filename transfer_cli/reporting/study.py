"""The trials of an Optuna search (`train -m hydra/sweeper=search`) for `transfer-cli report`.

The sweeper leaves optimization_results.yaml (the best parameters and objective) in the sweep folder;
each trial is a run folder under it. The report lists every trial with the searched values, the
validation objective it returned (its trainer.select_by on the best epoch) and its test acc1, best
first, the trial Optuna chose marked: the choice is made on validation, test is shown, never used.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from transfer_cli.analysis.output import markdown_table
from transfer_cli.reporting.runs import Run, find_runs

RESULTS_FILE = "optimization_results.yaml"


def study_sections(folders: Sequence[Path]) -> list[str]:
    """One markdown section per search found under the folders (none: an empty list)."""
    sections = []
    for folder in folders:
        for results_file in sorted(Path(folder).expanduser().rglob(RESULTS_FILE)):
            best = OmegaConf.to_container(OmegaConf.load(results_file))
            if isinstance(best, dict) and "best_params" in best:
                sections.append(_section(results_file.parent, best, find_runs([results_file.parent])))
    return sections


def _section(folder: Path, best: dict[str, Any], runs: list[Run]) -> str:
    keys = list(best["best_params"])
    select_by = str(runs[0].config.get("trainer.select_by", "acc1")) if runs else "acc1"
    done = [r for r in runs if r.results is not None]
    lower_better = select_by == "loss"

    def objective(run: Run) -> float:
        return float(run.results.get("val", {}).get(select_by, math.nan))

    done.sort(key=lambda r: (math.isnan(objective(r)), objective(r) if lower_better else -objective(r)))
    rows = [["**best**" if _is_best(r, best["best_params"]) else "", *(_value(r.config.get(k)) for k in keys),
             f"{objective(r):.4g}", f"{100 * r.results['test']['acc1']:.1f}"] for r in done]
    table = markdown_table(["", *keys, f"val {select_by} (objective)", "test acc1 (%)"], rows)
    chosen = ", ".join(f"{k}={_value(v)}" for k, v in best["best_params"].items())
    failed = len(runs) - len(done)
    return (f"Optuna search in {folder}: {len(done)} finished trial(s)" + (f", {failed} failed or unfinished" if failed else "")
            + f"; best by validation {select_by}: {chosen} ({select_by} {float(best['best_value']):.4g}).\n\n{table}")


def _is_best(run: Run, params: dict[str, Any]) -> bool:
    return all(_same(run.config.get(k), v) for k, v in params.items())


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12)
    return str(a) == str(b)


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
