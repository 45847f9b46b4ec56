"""`transfer-cli report DIR...`: one table (and plots) from the run folders of a sweep, or of any runs.

Every folder holding `.hydra/config.yaml` is a run: done (results.json), failed (failed.json, written
by a sweep job that raised) or unfinished (neither: still running, or killed). Runs are grouped by
the config keys that differ between them, seed excepted, so a sweep's table needs no arguments;
the statistic is over the runs of a group, i.e. over seeds. Everything but `report` (the command)
is a pure function of the runs, so the numbers can be tested without files.
"""
from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transfer_cli.analysis.output import markdown_table
from transfer_cli.engine.sweep import FAILED, RESULTS
from transfer_cli.errors import TransferCliError
from transfer_cli.io import atomic_path, read_jsonl

DEFAULT_METRIC = "test.acc1"
SAMPLES_KEY = "data.samples_per_class"
STRATEGY_KEY = "strategy.name"
# Keys that never define an experiment: the seed (what the statistic is over), names derived from
# other keys, and how/where a run executed (resuming, skipping, device, threads, logging, workers).
IGNORED_KEYS = frozenset({"seed", "name", "trainer.resume", "trainer.skip_done", "trainer.device",
                          "trainer.num_threads", "trainer.progress", "trainer.log_every",
                          "trainer.eval_batch_size", "data.num_workers"})
# results.json's `weights` (where the body's weights came from) joins a done run's keys as weights.*: a
# grouping key on request (--by weights.source), not by default (failed runs have no results.json)
IGNORED_PREFIXES = ("logger.", "weights.")
WEIGHTS_PREFIX = "weights."
# Grouping keys come first in this order (then in config order): table columns and sort order.
FIRST_KEYS = ("data.name", "backbone.name", SAMPLES_KEY, STRATEGY_KEY)


@dataclass
class Run:
    """One run folder: its flattened config and whatever it left behind."""

    folder: Path
    config: dict[str, Any]
    results: Optional[dict] = None
    error: Optional[str] = None  # failed.json's message
    curve: list[dict] = field(default_factory=list)  # metrics.jsonl, one record per epoch

    @property
    def status(self) -> str:
        if self.results is not None:
            return "done"
        return "failed" if self.error is not None else "unfinished"


# ---- reading run folders ---------------------------------------------------------------------
def find_runs(folders: Sequence[Path]) -> list[Run]:
    """Every run under the folders (recursively), each once, in path order."""
    run_dirs: dict[Path, None] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise TransferCliError(f"{folder} is not a folder; give a run folder or a sweep folder (multirun/...)")
        found = sorted(p.parent.parent for p in folder.rglob("config.yaml") if p.parent.name == ".hydra")
        if not found:
            raise TransferCliError(f"no runs under {folder}: no .hydra/config.yaml there; give the folder of a "
                                   "`transfer-cli train` run or of a `train -m` sweep")
        run_dirs.update((d.resolve(), None) for d in found)
    return [load_run(d) for d in run_dirs]


def load_run(folder: Path) -> Run:
    results_file, failed_file = folder / RESULTS, folder / FAILED
    results = json.loads(results_file.read_text()) if results_file.exists() else None
    error = json.loads(failed_file.read_text()).get("error", "failed") if failed_file.exists() else None
    config = load_config(folder / ".hydra" / "config.yaml")
    if results is not None and isinstance(results.get("weights"), dict):
        config.update(flatten(results["weights"], WEIGHTS_PREFIX))
    return Run(folder, config, results, error, read_jsonl(folder / "metrics.jsonl") if results is not None else [])


def load_config(path: Path) -> dict[str, Any]:
    """The flattened config as the run saw it; interpolations that cannot be resolved here stay as text."""
    cfg = OmegaConf.load(path)
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        tree = OmegaConf.to_container(cfg, resolve=False)
    return flatten(tree)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text so that values can be compared and shown."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat


# ---- choosing the grouping keys --------------------------------------------------------------
def varying_keys(runs: Sequence[Run]) -> list[str]:
    """Config keys whose value is not the same in every run (missing counts as a value), ignored keys
    left out, in table order."""
    keys = list(dict.fromkeys(k for run in runs for k in run.config))
    varying = [k for k in keys if len({run.config.get(k) for run in runs}) > 1
               and k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)]
    first = [k for k in FIRST_KEYS if k in varying]
    return first + [k for k in varying if k not in first]


def default_keys(runs: Sequence[Run]) -> tuple[list[str], list[str]]:
    """(grouping keys, varying keys left out because a grouping key already fixes their value).

    `strategy.alpha` exists only for l2sp and follows from `strategy.name`; with an experiment sweep
    `data.root` follows from `data.name`. Grouping on them would add columns, not groups.
    """
    kept: list[str] = []
    follow: list[str] = []
    for key in varying_keys(runs):
        (follow if any(_determines(runs, k, key) for k in kept) else kept).append(key)
    return kept, follow


def _determines(runs: Sequence[Run], key: str, other: str) -> bool:
    """True when every value of `key` comes with a single value of `other`."""
    seen: dict[Any, Any] = {}
    for run in runs:
        value, other_value = run.config.get(key), run.config.get(other)
        if seen.setdefault(value, other_value) != other_value:
            return False
    return True


def check_keys(keys: Sequence[str], runs: Sequence[Run]) -> None:
    known = list(dict.fromkeys(k for run in runs for k in run.config))
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            varying = ", ".join(varying_keys(runs)) or "none"
            raise TransferCliError(f"unknown --by key {key!r}; {hint}keys that vary across these runs: {varying} "
                                   "(any key of .hydra/config.yaml works, e.g. optim.lr)")


# ---- the table -------------------------------------------------------------------------------
@dataclass
class Group:
    """The runs sharing one value of each grouping key; statistics are over its done runs (its seeds)."""

    values: tuple
    scores: list[float] = field(default_factory=list)
    seeds: list[Any] = field(default_factory=list)
    best_epochs: list[int] = field(default_factory=list)
    train_times: list[float] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)
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
        if run.status == "failed":
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
    return sorted(groups.values(), key=lambda g: tuple(sort_key(v) for v in g.values))


def sort_key(value: Any) -> tuple:
    """Numbers numerically (5 < 10 < 20), then text, then missing values."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value, "")
    return (2, 0, "") if value is None else (1, 0, str(value))


def is_accuracy(metric: str) -> bool:
    """Accuracies (acc1, acc5, ...) are fractions in results.json and shown in %."""
    return metric.rsplit(".", 1)[-1].startswith("acc")


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


COUNT_HEADERS = ["n", "failed", "unfinished", "best epoch", "train time (s)", "trainable params"]


def markdown(table: Sequence[Group], keys: Sequence[str], metric: str) -> str:
    scale, unit, digits, std_digits = ((100.0, " (%)", ".1f", ".1f") if is_accuracy(metric)
                                       else (1.0, "", ".4g", ".2g"))

    def score(group: Group) -> str:
        if not group.n:
            return "-"
        text = f"{scale * group.mean:{digits}}"
        return text if group.n < 2 else f"{text} ± {scale * group.std:{std_digits}}"

    def number(values: Sequence[float], fmt: str) -> str:
        return f"{_mean(values):{fmt}}" if values else "-"

    rows = [[*(_cell(v) for v in g.values), score(g), g.n, g.failed, g.unfinished, number(g.best_epochs, ".1f"),
             number(g.train_times, ".1f"), number(g.trainable, ",.0f")] for g in table]
    return markdown_table([*keys, f"{metric}{unit}", *COUNT_HEADERS], rows)


def csv_text(table: Sequence[Group], keys: Sequence[str], metric: str) -> str:
    """The table in full precision, metric as in results.json (fractions, not %); empty = not available."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*keys, f"{metric}_mean", f"{metric}_std", "n", "failed", "unfinished", "seeds",
                     "best_epoch_mean", "train_time_s_mean", "params_trainable"])
    for g in table:
        stats = [g.mean, g.std, g.n, g.failed, g.unfinished, " ".join(str(s) for s in g.seeds),
                 _mean(g.best_epochs), _mean(g.train_times), round(_mean(g.trainable)) if g.n else math.nan]
        writer.writerow([*("" if v is None else v for v in g.values),
                         *("" if isinstance(v, float) and math.isnan(v) else v for v in stats)])
    return out.getvalue()


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def problems(runs: Sequence[Run], keys: Sequence[str], base: Path) -> list[str]:
    """One markdown line per failed or unfinished run: its folder (relative to `base` when inside it), its
    group and seed, what went wrong."""
    lines = []
    base = base.resolve()
    for run in runs:
        if run.status == "done":
            continue
        where = run.folder.relative_to(base) if run.folder.is_relative_to(base) else run.folder
        what = f"failed: {run.error}" if run.status == "failed" else "unfinished: no results.json (running or killed)"
        group = ", ".join(f"{k}={_cell(run.config.get(k))}" for k in keys)
        lines.append(f"- `{where}` ({group + ', ' if group else ''}seed={run.config.get('seed')}): {what}")
    return lines


# ---- the command -----------------------------------------------------------------------------
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
    parser.add_argument("--out", type=Path, default=None, metavar="DIR", help="where to write the report (default: the first DIR)")
    return parser


def report(argv: Sequence[str]) -> Path:
    """Run `transfer-cli report`: print the table, write report.md/.csv and the plots; return the output folder."""
    from transfer_cli.reporting import plots

    args = build_parser().parse_args(list(argv))
    runs = find_runs(args.folders)
    if args.by is None:
        keys, follow = default_keys(runs)
    else:
        check_keys(args.by, runs)
        keys, follow = args.by, []
    table = build_table(runs, keys, args.metric)
    if not any(g.n for g in table):
        raise TransferCliError(f"none of the {len(runs)} run(s) under {', '.join(map(str, args.folders))} has "
                               "finished (no results.json); see their failed.json files")
    notes = [f"{sum(g.n for g in table)} finished run(s) of {len(runs)}; {args.metric} mean ± sample std over seeds."]
    if follow:
        notes.append(f"Also varying, fixed by the grouping keys: {', '.join(follow)}.")
    pooled = [k for k in varying_keys(runs) if k not in keys and k not in follow]
    if pooled:
        notes.append(f"Pooled within each row (varying, not grouped on): {', '.join(pooled)}.")
    text = markdown(table, keys, args.metric) + "\n\n" + "\n".join(notes)
    failures = problems(runs, keys, args.folders[0].expanduser())
    if failures:
        text += "\n\nFailed or unfinished runs:\n" + "\n".join(failures)

    out = (args.out or args.folders[0]).expanduser()
    _write_text(out / "report.md", text + "\n")
    _write_text(out / "report.csv", csv_text(table, keys, args.metric))
    figures = plots.report_figures(runs, table, keys, args.metric)
    for name, figure in figures.items():
        with atomic_path(out / f"report_{name}.png") as tmp:
            figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    print(text)
    print(f"\n-> {out / 'report.md'}, report.csv, " + ", ".join(f"report_{n}.png" for n in figures))
    return out


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
