"""The `transfer-cli` command: train (a Hydra application), eval, list, export, report, analyze.

`train` arguments are Hydra overrides. They are checked by composing the config once before Hydra
runs, so a typo or an unknown name gets one line naming the problem and the valid choices instead
of Hydra's multi-line report.
"""
from __future__ import annotations

import difflib
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from transfer_cli.errors import TransferCliError
from transfer_cli.job_names import job_name

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name), replace=True)
# hydra.sweep.subdir: a sweep job's folder named by its own overrides (job_names.py)
OmegaConf.register_new_resolver("job_name", lambda overrides, exclude: job_name(overrides, exclude), replace=True)

USAGE = """usage: transfer-cli COMMAND [ARGS]

commands:
  train [KEY=VALUE ...] [-m]     train and evaluate (Hydra overrides; -m runs a sweep)
  eval run=RUN_DIR               re-evaluate a finished run's best checkpoint on its test split
  list strategies|backbones|datasets
                                 what exists, one line each
  export run=RUN_DIR out=FILE    save a run's trained body as a pretrained backbone (.safetensors)
  analyze cka|interpolate|criticality|spectrum RUN [OTHER] [--options]
                                 what was transferred: tables and plots in RUN/analysis/
                                 (transfer-cli analyze --help)
  report DIR... [--by KEY[,KEY]] [--metric test.acc1] [--out DIR]
                                 table (mean ± std over seeds) and plots of a sweep's runs

add --verbose (or HYDRA_FULL_ERROR=1) to see tracebacks"""

GROUP_OF_LIST = {"strategies": "strategy", "backbones": "backbone", "datasets": "data"}


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"
    argv = [a for a in argv if a != "--verbose"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, args = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], None]] = {
        "train": train_command, "eval": eval_command, "list": list_command, "export": export_command,
        "analyze": analyze_command, "report": report_command,
    }
    if command not in commands:
        _fail(f"unknown command {command!r}; choose one of: {', '.join(commands)} (transfer-cli --help)")
    try:
        commands[command](args)
    except TransferCliError as err:
        if verbose:
            raise
        _fail(str(err))


def _fail(message: str) -> None:
    print(f"transfer-cli: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- train -----------------------------------------------------------------------------------
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn", "--config-path", "-cp",
                          "--config-dir", "-cd", "--info", "-i", "--experimental-rerun"}


def train_command(args: list[str]) -> None:
    from transfer_cli.engine import distributed
    from transfer_cli.engine.sweep import LAST_SWEEP_FAILURES

    check_overrides(_overrides_only(args))
    scratch = None
    if distributed.launched():  # torchrun: processes must agree on one run folder
        args, scratch = distributed.hydra_args(args)
    sys.argv = [sys.argv[0], *args]
    LAST_SWEEP_FAILURES.clear()
    try:
        _train_app()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if LAST_SWEEP_FAILURES:
        raise TransferCliError(f"{len(LAST_SWEEP_FAILURES)} job(s) of the sweep failed, the others finished; "
                               f"see {LAST_SWEEP_FAILURES[0]}" + (" and the other failed.json files"
                                                                 if len(LAST_SWEEP_FAILURES) > 1 else ""))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    from transfer_cli.engine import distributed
    from transfer_cli.engine.run import run_training
    from transfer_cli.engine.sweep import in_sweep, run_job

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    main = True
    try:
        if distributed.launched():
            cfg.trainer.device = distributed.init(str(cfg.trainer.device))
            run_dir = Path(distributed.broadcast(str(run_dir)))  # rank 0's folder (see distributed.hydra_args)
            if distributed.is_main():
                described = distributed.describe(int(cfg.trainer.batch_size))
                print(f"data-parallel over {described['world_size']} processes: trainer.batch_size="
                      f"{described['batch_size']['per_process']} per process, {described['batch_size']['global']} "
                      "per optimizer step")
        results = run_job(cfg, run_dir, run_training, sweep=in_sweep())
        main = distributed.is_main()
    except TransferCliError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail(str(err))
    finally:
        distributed.shutdown()
    if results is None or not main:  # None: a failed sweep job, recorded in its failed.json
        return None
    from transfer_cli.reporting.results import summary

    print(f"{summary(results)}  -> {run_dir}")
    return results["test"]["acc1"]


def _overrides_only(args: list[str]) -> list[str]:
    """Drop Hydra's own flags (`-m`, `--cfg job`, ...) and keep the KEY=VALUE overrides."""
    overrides, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in HYDRA_FLAGS_WITH_VALUE
        else:
            overrides.append(arg)
    return overrides


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The config `train` would run with these overrides, or a TransferCliError saying what is wrong."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose("train", overrides=list(overrides))
    except MissingConfigException as err:
        raise TransferCliError(_explain_missing(err)) from None
    except HydraException as err:
        raise TransferCliError(_explain_override(err, overrides)) from None


def check_overrides(overrides: Sequence[str]) -> None:
    """Compose every value of every sweep once, so `-m a=x,y` fails before any job starts."""
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise TransferCliError(f"cannot parse the overrides: {str(err).splitlines()[0]}") from None
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    firsts = {o.input_line: f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" for o in sweeps}
    check_value_types(compose_config(base + list(firsts.values())), compose_config([]))
    for sweep in sweeps:
        others = [v for k, v in firsts.items() if k != sweep.input_line]
        for value in list(sweep.sweep_string_iterator())[1:]:
            compose_config(base + others + [f"{sweep.get_key_element()}={value}"])


def check_value_types(cfg: DictConfig, defaults: DictConfig) -> None:
    """A value whose default is a number or a boolean must stay one (YAML configs carry no schema)."""
    _check_types(OmegaConf.to_container(cfg, resolve=False), OmegaConf.to_container(defaults, resolve=False), "")


def _check_types(values: dict, defaults: dict, prefix: str) -> None:
    for key, default in defaults.items():
        if key not in values or values[key] is None or default is None:
            continue
        value, path = values[key], f"{prefix}{key}"
        if isinstance(default, dict) and isinstance(value, dict):
            _check_types(value, default, f"{path}.")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise TransferCliError(f"{path}={value!r} must be true or false")
        elif isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TransferCliError(f"{path}={value!r} must be a number (default {default})")


def _explain_missing(err: MissingConfigException) -> str:
    first = str(err).splitlines()[0]
    if "Could not find '" in first:
        group, _, name = first.split("Could not find '")[1].rstrip("'").rpartition("/")
        if group:
            options = ", ".join(config_options(group))
            return f"unknown {group} {name!r}; choose one of: {options}"
    return first


def _explain_override(err: HydraException, overrides: Sequence[str]) -> str:
    first = str(err).splitlines()[0]
    if first.startswith("Could not override '"):
        key = first.split("'")[1]
        hint = _closest_key(key)
        suffix = f" (did you mean {hint}?)" if hint else ""
        return f"unknown config key {key!r}{suffix}; `transfer-cli train --cfg job` shows every key"
    return first


def _closest_key(key: str) -> str | None:
    parent, _, leaf = key.rpartition(".")
    try:
        node = compose_config([])
        node = OmegaConf.select(node, parent) if parent else node
    except TransferCliError:
        return None
    if not isinstance(node, DictConfig):
        return None
    match = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
    return f"{parent}.{match[0]}" if match and parent else (match[0] if match else None)


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


# ---- list ------------------------------------------------------------------------------------
def list_command(args: list[str]) -> None:
    if len(args) != 1 or args[0] not in GROUP_OF_LIST:
        raise TransferCliError("usage: transfer-cli list strategies|backbones|datasets")
    group = GROUP_OF_LIST[args[0]]
    names = config_options(group)
    width = max(len(n) for n in names)
    for name in names:
        print(f"{name:<{width}}  {config_summary(group, name)}")


def config_summary(group: str, name: str) -> str:
    """A config file's first comment line: the one-line description `list` prints."""
    for line in (CONFIG_DIR / group / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


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


def run_config(run_dir: Path, overrides: dict[str, str]) -> DictConfig:
    """A finished run's recorded config (.hydra/config.yaml) with `overrides` (e.g. trainer.device) on top."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.exists():
        raise TransferCliError(f"{run_dir} is not a run folder (no .hydra/config.yaml); pass run=<a folder under runs/>")
    cfg = OmegaConf.load(config_file)
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    except Exception as err:  # omegaconf's errors for unknown keys and bad values
        raise TransferCliError(f"bad override for this run: {str(err).splitlines()[0]}") from None


def eval_command(args: list[str]) -> None:
    from transfer_cli.engine.evaluate_run import evaluate_run

    values = _parse_keyvalues(args, ["run"])
    run_dir = Path(values.pop("run")).expanduser()
    result = evaluate_run(run_config(run_dir, values), run_dir)
    print(f"test acc1 {result['test']['acc1']:.4f}  loss {result['test']['loss']:.4f}  "
          f"(checkpoint of epoch {result['epoch']})  -> {run_dir / 'eval.json'}")


def export_command(args: list[str]) -> None:
    from transfer_cli.engine.evaluate_run import export_run

    values = _parse_keyvalues(args, ["run", "out"])
    run_dir = Path(values.pop("run")).expanduser()
    out = Path(values.pop("out")).expanduser()
    export_run(run_config(run_dir, values), run_dir, out)
    print(f"wrote {out}")


def analyze_command(args: list[str]) -> None:
    from transfer_cli.analysis.command import analyze

    analyze(args)


def report_command(args: list[str]) -> None:
    from transfer_cli.reporting.report import report

    report(args)
