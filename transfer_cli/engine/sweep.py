"""One job of a sweep (`transfer-cli train -m`): skip it when done, resume it when killed, record it when it fails.

A sweep is many runs sharing one folder. A failing job must not stop the others, so its error goes
to `failed.json` in its folder and the sweep goes on; `SweepOutcome` (a Hydra callback) counts those
files at the end so that the command still exits non-zero. Re-running a sweep in the same
`hydra.sweep.dir` skips the jobs that wrote results.json and resumes the ones that were killed.
Every job holds its folder while it runs (run_lock): a folder another live process holds is refused
(a single run) or skipped, since that process is running it (a sweep).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from transfer_cli.engine import distributed
from transfer_cli.engine.run_lock import RunFolderHeld, hold_run_folder
from transfer_cli.errors import TransferCliError
from transfer_cli.io import write_json
from transfer_cli.run_folder import FAILED, RunFolder

# failed.json files of the last sweep this process ran, filled by SweepOutcome.on_multirun_end
LAST_SWEEP_FAILURES: list[Path] = []


def in_sweep() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def skip_done(cfg: DictConfig, sweep: bool) -> bool:
    """trainer.skip_done: auto (the default) is on in a sweep and off for a single run."""
    value = cfg.trainer.get("skip_done", "auto")
    if value == "auto":
        return sweep
    if isinstance(value, bool):
        return value
    raise TransferCliError(f"trainer.skip_done={value!r}; choose auto, true or false")


def thread_share(launcher: Any, cpus: int) -> Optional[int]:
    """Torch threads for one job: the launcher's cpus_per_task (SLURM), else the CPUs split over n_jobs (local)."""
    per_task = launcher.get("cpus_per_task") if launcher is not None else None
    if per_task == "auto":  # fitted to the partition at submission (slurm_resources): what SLURM gave the job
        per_task = os.environ.get("SLURM_CPUS_PER_TASK") or cpus
    if per_task:
        return int(per_task)
    n_jobs = launcher.get("n_jobs") if launcher is not None else None
    if not n_jobs:
        return None
    n_jobs = int(n_jobs) if n_jobs > 0 else max(cpus + 1 + int(n_jobs), 1)  # joblib: -1 = all CPUs, -2 = all but one
    return max(cpus // n_jobs, 1)


def job_device(device: str, launcher: Any, job_num: int) -> str:
    """A local sweep (n_jobs) on several GPUs with trainer.device=auto: job k runs on cuda:<k mod GPUs>."""
    if device != "auto" or launcher is None or not launcher.get("n_jobs"):
        return device
    import torch

    gpus = torch.cuda.device_count()
    return f"cuda:{job_num % gpus}" if gpus > 1 else device


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def run_job(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict], sweep: bool) -> Optional[dict]:
    """Run one job (a single run or one job of a sweep); in a sweep a failure returns None, never raises.

    With skip_done on, a folder holding results.json is skipped (its results returned) and a folder
    whose run was killed resumes from checkpoints/last.pt. A sweep job also forgets an earlier
    failure and takes its share of the CPU threads unless trainer.num_threads is set.
    """
    if not sweep:
        return _claim_and_run(cfg, run_dir, train, sweep=False)
    try:
        RunFolder(run_dir).failed_file.unlink(missing_ok=True)
        hydra_cfg = HydraConfig.get()
        with open_dict(cfg):
            if cfg.trainer.num_threads is None:
                cfg.trainer.num_threads = thread_share(hydra_cfg.launcher, available_cpus())
            cfg.trainer.device = job_device(str(cfg.trainer.device), hydra_cfg.launcher, int(hydra_cfg.job.num))
        return _claim_and_run(cfg, run_dir, train, sweep=True)
    except RunFolderHeld as err:  # not a failure: the other process is running this job
        print(f"skipped, {err}")
        return None
    except Exception as err:  # noqa: BLE001 - one job's failure, whatever it is, must not stop the sweep
        print(f"transfer-cli: job failed: {run_dir}: {first_line(err)}", file=sys.stderr)
        try:
            record_failure(run_dir, err)
        except TransferCliError as unwritten:  # a full or read-only disk: say so, the sweep goes on
            print(f"transfer-cli: {unwritten}", file=sys.stderr)
        return None


def _claim_and_run(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict], sweep: bool) -> dict:
    """Hold the run folder (the process that writes files: rank 0 of a torchrun), then skip or train."""
    with hold_run_folder(run_dir) if distributed.is_main() else nullcontext():
        return _skip_or_train(cfg, run_dir, train, sweep)


def _skip_or_train(cfg: DictConfig, run_dir: Path, train: Callable[[DictConfig, Path], dict], sweep: bool) -> dict:
    if skip_done(cfg, sweep):
        done = RunFolder(run_dir).read_results()
        if done is not None:
            print(f"skipped, results.json exists (trainer.skip_done): {run_dir}")
            return done
        with open_dict(cfg):
            cfg.trainer.resume = True  # a fresh folder starts at epoch 0; a killed run continues
    return train(cfg, run_dir)


def first_line(err: BaseException) -> str:
    """The error's first line; a bug (not a TransferCliError) is prefixed with its type."""
    lines = str(err).strip().splitlines()
    message = lines[0] if lines else ""
    return message if isinstance(err, TransferCliError) else f"{type(err).__name__}: {message}".rstrip(": ")


def record_failure(run_dir: Path, err: BaseException) -> None:
    """failed.json: the one-line error; the traceback too when the error is a bug, not a config mistake."""
    record = {"error": first_line(err), "error_type": type(err).__name__, "time": time.time()}
    if not isinstance(err, TransferCliError):
        record["traceback"] = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    write_json(RunFolder(run_dir).failed_file, record)


def sweep_failures(sweep_dir: Path, since: float) -> list[Path]:
    """The failed.json files written under the sweep folder since `since` (this sweep's failures)."""
    return sorted(p for p in Path(sweep_dir).rglob(FAILED) if p.stat().st_mtime >= since)


class SweepOutcome(Callback):
    """Collects the failed jobs of a multirun in the launching process, for the command's exit status."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time() - 1.0  # mtime granularity
        LAST_SWEEP_FAILURES.clear()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        LAST_SWEEP_FAILURES[:] = sweep_failures(Path(str(config.hydra.sweep.dir)), self.started)
