"""`transfer-cli train`: the Hydra application around one run or a sweep (`-m`).

The arguments are checked first (`transfer_cli.overrides`); torchrun's processes are given one run
folder; each job goes through `engine.sweep.run_job`, which records a failed sweep job instead of
stopping the sweep, and the command fails at the end when any job did.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from transfer_cli.config_files import CONFIG_DIR
from transfer_cli.errors import TransferCliError, fail
from transfer_cli.io import atomic_path
from transfer_cli.overrides import check_overrides, overrides_only
from transfer_cli.run_folder import HYDRA


def train_command(args: list[str]) -> None:
    from transfer_cli.engine import distributed
    from transfer_cli.engine.sweep import LAST_SWEEP_FAILURES

    check_overrides(overrides_only(args))
    scratch = None
    if distributed.launched():  # torchrun: processes must agree on one run folder
        args, scratch = distributed.hydra_args(args)
    sys.argv = [sys.argv[0], *args]
    LAST_SWEEP_FAILURES.clear()
    try:
        with _kept_run_config(args):
            _train_app()
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if LAST_SWEEP_FAILURES:
        raise TransferCliError(f"{len(LAST_SWEEP_FAILURES)} job(s) of the sweep failed, the others finished; "
                               f"see {LAST_SWEEP_FAILURES[0]}" + (" and the other failed.json files"
                                                                 if len(LAST_SWEEP_FAILURES) > 1 else ""))


@contextmanager
def _kept_run_config(args: list[str]) -> Iterator[None]:
    """A command refused in a folder that holds a run (exit 2: a bad input, the folder in use) leaves that
    run's .hydra/ files as they were. Hydra writes the command's config there before any check can run,
    and `eval`, `export`, `report` and a resume read the run's config from there."""
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    hydra_dir = Path(run_dir).expanduser() / HYDRA if run_dir else None
    if hydra_dir is None or not hydra_dir.is_dir() or any(a in ("-m", "--multirun") for a in args):
        yield
        return
    saved = {path: path.read_bytes() for path in hydra_dir.glob("*.yaml")}
    try:
        yield
    except SystemExit as stop:
        if stop.code == 2:
            for path, content in saved.items():
                with atomic_path(path) as tmp:
                    tmp.write_bytes(content)
        raise


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
        fail(str(err))
    finally:
        distributed.shutdown()
    if results is None or not main:  # None: a failed sweep job, recorded in its failed.json
        return None
    from transfer_cli.engine.results import summary

    print(f"{summary(results)}  -> {run_dir}")
    return objective(results, str(cfg.trainer.select_by))


def objective(results: dict, select_by: str) -> float:
    """What the app returns to a Hydra sweeper (hydra/sweeper=optuna): the best epoch's validation
    `trainer.select_by`, never a test number, so that a search cannot select on the test split."""
    return float(results["val"].get(select_by, math.nan))
