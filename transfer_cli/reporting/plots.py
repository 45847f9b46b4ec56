"""The report's plots: the metric per strategy (bars), the metric against labelled samples per class
(lines, when that varies), the validation curves of every run and, for the routing strategies
(SpotTune, AdaFilter), the share of the fine-tuned path per block.

Each function returns a matplotlib `Figure` (object API, rendered by Agg when saved), so tests can
count its bars and lines and no pyplot state or GUI backend is touched.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from transfer_cli.reporting.grouping import SAMPLES_KEY, STRATEGY_KEY
from transfer_cli.reporting.runs import Run
from transfer_cli.reporting.table import Group, build_table, in_percent, sort_key

CURVE_KEY = "val_acc1"
ROUTING_PREFIX = "finetuned/"  # metrics.jsonl keys of transfer_cli.strategies.routing.Routing.fractions


def report_figures(runs: Sequence[Run], table: Sequence[Group], keys: Sequence[str],
                   metric: str) -> dict[str, Figure]:
    """The plots for one report, by file suffix: bars always, samples and curves when there is data for them."""
    figures = {"bars": bar_chart(table, keys, metric)}
    if len({r.config.get(SAMPLES_KEY) for r in runs if r.status == "done"}) > 1:
        by_samples = list(keys) if SAMPLES_KEY in keys else [*keys, SAMPLES_KEY]
        figures["samples"] = samples_chart(build_table(runs, by_samples, metric), by_samples, metric)
    curves = learning_curves(runs, keys)
    if curves is not None:
        figures["curves"] = curves
    routing = routing_chart(runs, keys)
    if routing is not None:
        figures["routing"] = routing
    return figures


def bar_chart(table: Sequence[Group], keys: Sequence[str], metric: str) -> Figure:
    """One bar group per strategy (or per value of the first key), one bar per value of the other keys."""
    x_key = _main_key(keys)
    x_keys = [x_key] if x_key else []
    hue_keys = [k for k in keys if k != x_key]
    done = [g for g in table if g.n]
    xs = _unique(_pick(g, keys, x_keys) for g in done)
    hues = _unique(_pick(g, keys, hue_keys) for g in done)
    scale = _scale(metric)
    fig = Figure(figsize=(max(6.0, 0.45 * len(done) + 2.5), 4.5))
    ax = fig.subplots()
    width = 0.8 / len(hues)
    for i, hue in enumerate(hues):
        groups = [g for g in done if _pick(g, keys, hue_keys) == hue]
        positions = [xs.index(_pick(g, keys, x_keys)) - 0.4 + width * (i + 0.5) for g in groups]
        ax.bar(positions, [scale * g.mean for g in groups], width * 0.95,
               yerr=[scale * g.std for g in groups], capsize=3,  # NaN (one seed): no error bar
               color=_colour(i, len(hues)), label=_label([], hue) if hue_keys else None)
    ax.set_xticks(range(len(xs)), [_label([], x) if x_key else "all runs" for x in xs],
                  rotation=30 if len(xs) > 6 else 0, ha="right" if len(xs) > 6 else "center")
    ax.set_xlabel(_name(x_key) if x_key else "")
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{metric} per {_name(x_key) if x_key else 'group'} (mean ± std over seeds)")
    ax.grid(axis="y", alpha=0.3)
    if hue_keys:
        ax.legend(title=", ".join(_name(k) for k in hue_keys), fontsize="small")
    return fig


def samples_chart(table: Sequence[Group], keys: Sequence[str], metric: str) -> Figure:
    """The metric against data.samples_per_class: one line per strategy (per value of the other keys),
    a band of ± one std over seeds. `keys` must contain data.samples_per_class."""
    line_keys = [k for k in keys if k != SAMPLES_KEY]
    done = [g for g in table if g.n]
    scale = _scale(metric)
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.subplots()
    lines = _unique(_pick(g, keys, line_keys) for g in done)
    for i, line in enumerate(lines):
        groups = sorted((g for g in done if _pick(g, keys, line_keys) == line),
                        key=lambda g: sort_key(_pick(g, keys, [SAMPLES_KEY])[0]))
        x = np.array([_pick(g, keys, [SAMPLES_KEY])[0] for g in groups], dtype=float)
        y = np.array([scale * g.mean for g in groups])
        band = np.array([0.0 if math.isnan(g.std) else scale * g.std for g in groups])
        colour = _colour(i, len(lines))
        ax.plot(x, y, marker="o", color=colour, label=_label([], line) if line_keys else metric)
        ax.fill_between(x, y - band, y + band, color=colour, alpha=0.2, linewidth=0)
    ticks = sorted({_pick(g, keys, [SAMPLES_KEY])[0] for g in done})
    if min(ticks) > 0 and max(ticks) / min(ticks) >= 4:
        ax.set_xscale("log")
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled samples per class (data.samples_per_class)")
    ax.set_ylabel(_axis_label(metric))
    ax.set_title(f"{metric} vs labelled samples per class (band: ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(title=", ".join(_name(k) for k in line_keys) or None, fontsize="small")
    return fig


def learning_curves(runs: Sequence[Run], keys: Sequence[str]) -> Optional[Figure]:
    """Validation accuracy per epoch: a thin line per run and a thick one for the mean over its group,
    coloured by strategy; one panel per value of the other grouping keys. None without any curve."""
    done = [r for r in runs if r.status == "done" and any(CURVE_KEY in rec for rec in r.curve)]
    if not done:
        return None
    colour_key = _main_key(keys)
    panel_keys = [k for k in keys if k != colour_key]
    colour_keys = [colour_key] if colour_key else []
    colour_values = _unique(_config(r, colour_keys) for r in done)
    panels = _unique(_config(r, panel_keys) for r in done)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.8 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True).ravel()
    for ax, panel in zip(axes, panels):
        for i, value in enumerate(colour_values):
            members = [r for r in done if _config(r, panel_keys) == panel
                       and _config(r, colour_keys) == value]
            if members:
                _plot_curves(ax, members, _colour(i, len(colour_values)), _label([], value) if colour_key else "mean",
                             lambda rec: 100.0 * rec[CURVE_KEY] if CURVE_KEY in rec else None)
        ax.set_title(_label(panel_keys, panel) if panel_keys else "all runs", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(title=_name(colour_key) if colour_key else None, fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    fig.suptitle("Validation accuracy per epoch (thin: each run, thick: mean over seeds)")
    return fig


def routing_chart(runs: Sequence[Run], keys: Sequence[str]) -> Optional[Figure]:
    """Left: per block (network order), the fraction of examples / units that took the fine-tuned path
    at each run's best epoch, mean ± std over the seeds of each table group. Right: that fraction
    averaged over blocks, per epoch. None when no finished run logged `finetuned/<block>`."""
    done = [(r, record) for r in runs if r.status == "done" and (record := routing_record(r))]
    if not done:
        return None
    groups = _unique(_config(r, keys) for r, _ in done)
    blocks = sorted({k for _, record in done for k in record}, key=_network_order)
    width = max(6.0, 0.35 * len(blocks) + 2.5)
    fig = Figure(figsize=(width + 5.0, 4.5), layout="constrained")
    by_block, by_epoch = fig.subplots(1, 2, width_ratios=[width, 5.0])
    for i, group in enumerate(groups):
        members = [r for r, _ in done if _config(r, keys) == group]
        at_best = [record for r, record in done if _config(r, keys) == group]
        label = _label([], group) if keys else "all runs"
        colour = _colour(i, len(groups))
        present = [b for b in blocks if any(b in rec for rec in at_best)]
        values = [[rec[b] for rec in at_best if b in rec] for b in present]
        dodge = 0.15 * (i / (len(groups) - 1) - 0.5) if len(groups) > 1 else 0.0  # error bars side by side
        by_block.errorbar([blocks.index(b) + dodge for b in present], [float(np.mean(v)) for v in values],
                          yerr=[float(np.std(v, ddof=1)) if len(v) > 1 else math.nan for v in values],
                          color=colour, marker="o", capsize=3, label=label)
        _plot_curves(by_epoch, members, colour, label, _mean_routing)
    by_block.set_xticks(range(len(blocks)), [b.removeprefix(ROUTING_PREFIX) for b in blocks],
                        rotation=45, ha="right")
    by_block.set_xlabel("block (network order)")
    by_block.set_title("at the best epoch (mean ± std over seeds)", fontsize="medium")
    by_epoch.set_xlabel("epoch")
    by_epoch.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_epoch.set_title("mean over blocks, per epoch (thin: each run)", fontsize="medium")
    for ax in (by_block, by_epoch):
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel("fraction on the fine-tuned path")
        ax.grid(alpha=0.3)
    by_block.legend(title=", ".join(_name(k) for k in keys) or None, fontsize="small")
    fig.suptitle("Routing: share of examples (SpotTune) / units (AdaFilter) on the fine-tuned path")
    return fig


def routing_record(run: Run) -> dict[str, float]:
    """The run's `finetuned/<block>` values at its best epoch (results.json), else at its last logged
    epoch with routing values; empty when it has none."""
    logged = [rec for rec in run.curve if any(k.startswith(ROUTING_PREFIX) for k in rec)]
    if not logged:
        return {}
    best = (run.results or {}).get("best_epoch")
    record = next((rec for rec in reversed(logged) if rec["epoch"] == best), logged[-1])
    return {k: v for k, v in record.items() if k.startswith(ROUTING_PREFIX)}


def _network_order(block: str) -> tuple:
    """metrics.jsonl sorts its keys; numbers compared as numbers give back the network order of timm and
    Hugging Face block names (layer1.1 < layer2.0, blocks.2 < blocks.10, encoder.layer.9 < encoder.layer.10)."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", block))


def _mean_routing(record: dict) -> Optional[float]:
    values = [v for k, v in record.items() if k.startswith(ROUTING_PREFIX)]
    return float(np.mean(values)) if values else None


def _plot_curves(ax: Axes, runs: Sequence[Run], colour: Any, label: str,
                 value: Callable[[dict], Optional[float]]) -> None:
    """A thin line per run and a thick one for the mean per epoch; `value` reads a metrics.jsonl record
    (None: nothing to plot for that epoch)."""
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        points = [(rec["epoch"], y) for rec in run.curve if (y := value(rec)) is not None]
        ax.plot(*zip(*points), color=colour, alpha=0.3, linewidth=1.0)
        for epoch, y in points:
            per_epoch.setdefault(epoch, []).append(y)
    epochs = sorted(per_epoch)
    ax.plot(epochs, [float(np.mean(per_epoch[e])) for e in epochs], color=colour, linewidth=2.2, marker="o",
            markersize=3, label=label)


# ---- helpers ---------------------------------------------------------------------------------
def _main_key(keys: Sequence[str]) -> Optional[str]:
    """What the bars and colours are about: the strategy when it is a grouping key, else the first key."""
    return STRATEGY_KEY if STRATEGY_KEY in keys else (keys[0] if keys else None)


def _pick(group: Group, keys: Sequence[str], wanted: Sequence[str]) -> tuple:
    return tuple(group.values[list(keys).index(k)] for k in wanted)


def _config(run: Run, wanted: Sequence[str]) -> tuple:
    return tuple(run.config.get(k) for k in wanted)


def _unique(values) -> list[tuple]:
    """Distinct value tuples in table order (numbers numerically)."""
    return sorted(set(values), key=lambda t: tuple(sort_key(v) for v in t))


def _label(keys: Sequence[str], values: tuple) -> str:
    if not keys:
        return ", ".join("-" if v is None else str(v) for v in values)
    return ", ".join(f"{_name(k)}={'-' if v is None else v}" for k, v in zip(keys, values))


def _name(key: str) -> str:
    """strategy.name -> strategy; other keys keep their full dotted name."""
    return key.removesuffix(".name")


def _scale(metric: str) -> float:
    return 100.0 if in_percent(metric) else 1.0


def _axis_label(metric: str) -> str:
    return f"{metric} (%)" if in_percent(metric) else metric


def _colour(index: int, count: int) -> Any:
    return colormaps["tab10" if count <= 10 else "tab20"](index % 20)
