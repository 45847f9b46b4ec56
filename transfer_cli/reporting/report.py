"""`transfer-cli report DIR...`: one table (and plots) from the run folders of a sweep, or of any runs.

Runs are found under the folders (`reporting.runs`), grouped by the config keys that differ between
them, seed excepted (`reporting.grouping`), so a sweep's table needs no arguments; the statistic is
over the runs of a group, i.e. over seeds (`reporting.table`). `reporting.render` writes the table as
markdown and CSV, `reporting.plots` draws it; this module is the command around them.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path
from typing import Sequence

from transfer_cli.errors import TransferCliError
from transfer_cli.io import atomic_path
from transfer_cli.reporting import plots
from transfer_cli.reporting.continual import accuracy_curve, continual_table
from transfer_cli.reporting.grouping import check_keys, default_keys, varying_keys
from transfer_cli.reporting.render import csv_text, markdown, problems
from transfer_cli.reporting.runs import find_runs
from transfer_cli.reporting.study import study_sections
from transfer_cli.reporting.table import DEFAULT_METRIC, build_table


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one TransferCliError line instead of usage text and exit."""

    def error(self, message: str) -> None:
        raise TransferCliError(f"report: {message} (see transfer-cli report --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="transfer-cli report",
                     description="Table (mean ± std over seeds) and plots of the runs under the folders; "
                                 "writes report.md, report.csv and report_*.png.")
    parser.add_argument("folders", type=Path, nargs="+", metavar="DIR", help="run or sweep folders")
    parser.add_argument("--by", type=lambda s: [k.strip() for k in s.split(",") if k.strip()], default=None,
                        metavar="KEY[,KEY]", help="group by these config keys (default: the keys that vary, seed "
                                                  "and keys that follow from others excepted)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"a number in results.json (default {DEFAULT_METRIC})")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where to write the report (default: the DIR itself when there is one; a new "
                             "reports/pooled-<hash> folder, named on stdout, when several are pooled)")
    return parser


def report(argv: Sequence[str]) -> Path:
    """Run `transfer-cli report`: print the table, write report.md/.csv and the plots; return the output folder."""
    args = build_parser().parse_args(list(argv))
    runs = find_runs(args.folders)
    tabled = [r for r in runs if r.config]  # a run whose config is damaged cannot be placed in a group
    if args.by is None:
        keys, follow = default_keys(tabled)
    else:
        check_keys(args.by, tabled)
        keys, follow = args.by, []
    table = build_table(tabled, keys, args.metric)
    if not any(g.n for g in table):
        raise TransferCliError(f"none of the {len(runs)} run(s) under {', '.join(map(str, args.folders))} has "
                               "finished (no results.json); see their failed.json files")
    notes = [f"{sum(g.n for g in table)} finished run(s) of {len(runs)}; {args.metric} mean ± sample std over seeds."]
    if follow:
        notes.append(f"Also varying, fixed by the grouping keys: {', '.join(follow)}.")
    pooled = [k for k in varying_keys(tabled) if k not in keys and k not in follow]
    if pooled:
        notes.append(f"Pooled within each row (varying, not grouped on): {', '.join(pooled)}.")
    text = markdown(table, keys, args.metric) + "\n\n" + "\n".join(notes)
    scenario = continual_table(runs, keys)
    if scenario:
        text += ("\n\nClass-incremental runs: average incremental accuracy Ā, last accuracy, forgetting; mean ± "
                 "sample std over seeds (per-seed values in brackets).\n\n" + scenario)
    for section in study_sections(args.folders):  # an Optuna search: its trials and the best one
        text += "\n\n" + section
    failures = problems(runs, keys, args.folders[0].expanduser())
    if failures:
        text += "\n\nFailed, damaged or unfinished runs:\n" + "\n".join(failures)

    out = (args.out or default_out(args.folders)).expanduser()
    _write_text(out / "report.md", text + "\n")
    _write_text(out / "report.csv", csv_text(table, keys, args.metric))
    figures = plots.report_figures(runs, table, keys, args.metric)
    curve = accuracy_curve(runs, keys)
    if curve is not None:
        figures["continual"] = curve
    for name, figure in figures.items():
        with atomic_path(out / f"report_{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    print(text)
    print(f"\n-> {out / 'report.md'}, report.csv, " + ", ".join(f"report_{n}.png" for n in figures))
    return out


def default_out(folders: Sequence[Path]) -> Path:
    """One folder's report goes into it; several folders pool into a report of their own, never over
    the first folder's report: reports/pooled-<hash of the folders>, the same for the same folders."""
    if len(folders) == 1:
        return folders[0]
    names = "\n".join(str(Path(f).expanduser().resolve()) for f in folders)
    return Path("reports") / f"pooled-{hashlib.sha256(names.encode()).hexdigest()[:8]}"


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
