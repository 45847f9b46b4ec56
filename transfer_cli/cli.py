"""The `transfer-cli` command: dispatch to train (`transfer_cli.train_app`, a Hydra application),
eval, predict, list, export, report and analyze, and the one-line error every TransferCliError becomes.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from transfer_cli.config_files import CONFIG_DIR, config_options, config_summary
from transfer_cli.errors import TransferCliError, fail
from transfer_cli.run_folder import RunFolder, run_config
from transfer_cli.train_app import train_command

USAGE = """usage: transfer-cli COMMAND [ARGS]

commands:
  train [KEY=VALUE ...] [-m]     train and evaluate (Hydra overrides; -m runs a sweep)
  eval run=RUN_DIR               re-evaluate a finished run's best checkpoint on its test split
  predict run=RUN_DIR input=PATH [out=FILE.csv] [topk=5] [column=TEXT_COLUMN]
                                 classify an image, a folder of images or a CSV/JSONL of texts
  list strategies|regularizers|backbones|datasets
                                 what exists, one line each
  export run=RUN_DIR out=FILE [format=native]
                                 save a run's trained body as a pretrained backbone (.safetensors), or
                                 (format=native) the classifier as a timm / Hugging Face folder
  analyze cka|interpolate|criticality|spectrum RUN [OTHER] [--options]
                                 what was transferred: tables and plots in RUN/analysis/
                                 (transfer-cli analyze --help)
  report DIR... [--by KEY[,KEY]] [--metric test.acc1] [--out DIR]
                                 table (mean ± std over seeds) and plots of a sweep's runs

add --verbose (or HYDRA_FULL_ERROR=1) to see tracebacks"""

GROUP_OF_LIST = {"strategies": "strategy", "regularizers": "regularizers", "backbones": "backbone", "datasets": "data"}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, args = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], None]] = {
        "train": train_command, "eval": eval_command, "predict": predict_command, "list": list_command,
        "export": export_command,
        "analyze": analyze_command, "report": report_command,
    }
    if command not in commands:
        fail(f"unknown command {command!r}; choose one of: {', '.join(commands)} (transfer-cli --help)")
    try:
        commands[command](args)
    except TransferCliError as err:
        if verbose:
            raise
        fail(str(err))


# ---- list ------------------------------------------------------------------------------------
def list_command(args: list[str]) -> None:
    if len(args) != 1 or args[0] not in GROUP_OF_LIST:
        raise TransferCliError("usage: transfer-cli list strategies|regularizers|backbones|datasets")
    group = GROUP_OF_LIST[args[0]]
    names = config_options(group)
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {describe(group, name)}")


def describe(group: str, name: str) -> str:
    """A strategy or regularizer term is described by its class's docstring (the code it names); a backbone
    or dataset config is a preset of a builder, described by the config file's first comment line."""
    if group not in ("strategy", "regularizers"):
        return config_summary(group, name)
    from transfer_cli.strategies import REGULARIZERS, STRATEGIES

    if group == "regularizers":
        return REGULARIZERS.summary(name)
    from omegaconf import OmegaConf

    return STRATEGIES.summary(OmegaConf.load(CONFIG_DIR / group / f"{name}.yaml").name)


# ---- eval and export -------------------------------------------------------------------------
def _parse_keyvalues(args: list[str], required: Sequence[str]) -> dict[str, str]:
    values = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise TransferCliError(f"expected KEY=VALUE, got {arg!r} (e.g. run=runs/2026-11-23/10-00-00_finetune)")
        values[key] = value
    missing = [k for k in required if k not in values]
    if missing:
        raise TransferCliError(f"missing {', '.join(f'{k}=...' for k in missing)}")
    return values


def eval_command(args: list[str]) -> None:
    from transfer_cli.engine.evaluate_run import evaluate_run

    values = _parse_keyvalues(args, ["run"])
    run_dir = Path(values.pop("run")).expanduser()
    result = evaluate_run(run_config(run_dir, values), run_dir)
    print(f"test acc1 {result['test']['acc1']:.4f}  loss {result['test']['loss']:.4f}  "
          f"(checkpoint of epoch {result['epoch']})  -> {RunFolder(run_dir).eval_file}")


def predict_command(args: list[str]) -> None:
    from transfer_cli.engine.predict import predict_run

    values = _parse_keyvalues(args, ["run", "input"])
    run_dir = Path(values.pop("run")).expanduser()
    source = Path(values.pop("input")).expanduser()
    out = Path(values.pop("out")).expanduser() if "out" in values else None
    topk = values.pop("topk", "5")
    if not topk.isdigit():
        raise TransferCliError(f"topk={topk!r} must be a whole number, e.g. topk=5")
    column = values.pop("column", None)
    done = predict_run(run_config(run_dir, values), run_dir, source, out, int(topk), column)
    skipped = f", {done.unreadable} unreadable input(s) skipped" if done.unreadable else ""
    print(f"predicted {done.predicted} input(s){skipped} -> {done.out}")


def export_command(args: list[str]) -> None:
    from transfer_cli.engine.evaluate_run import export_run

    values = _parse_keyvalues(args, ["run", "out"])
    run_dir = Path(values.pop("run")).expanduser()
    out = Path(values.pop("out")).expanduser()
    kind = values.pop("format", "source")
    if kind not in ("source", "native"):
        raise TransferCliError(f"format={kind!r}: choose source (a backbone for backbone.weights=) or native "
                               "(a timm / Hugging Face classifier folder)")
    export_run(run_config(run_dir, values), run_dir, out, native=kind == "native")
    print(f"wrote {out}")


def analyze_command(args: list[str]) -> None:
    from transfer_cli.analysis.command import analyze

    analyze(args)


def report_command(args: list[str]) -> None:
    from transfer_cli.reporting.report import report

    report(args)
