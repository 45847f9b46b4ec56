"""`hydra/launcher=slurm`: hydra-submitit-launcher's SLURM launcher, made to behave on a real cluster.

Before submitting, the request is fitted to the partition and checked against it (slurm_resources),
and a signal delay too close to the time limit is corrected. While the jobs wait, the sweep says
where they stand and why (the queue's reason) every `status_every_s` seconds. A job whose run fails
writes failed.json, as every sweep job does, and then raises, so that SLURM records it as FAILED
(what sacct and cluster dashboards show); this launcher counts it as done, so the rest of the sweep
goes on and `train -m` exits non-zero at the end. A job that ends without a result (killed, out of
memory, cancelled) gets a failed.json written for it here.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

from transfer_cli.errors import TransferCliError

OWN_KEYS = ("status_every_s",)  # read here, not passed to submitit
RESULT_WAIT_S = 15.0  # as submitit waits for a finished job's result file


@dataclass
class TransferCliSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.transfer_cli_launcher.slurm_launcher.SlurmLauncher"
    # auto: fitted to the partition (see transfer_cli.engine.slurm_resources)
    gpus_per_node: Any = "auto"
    cpus_per_task: Any = "auto"
    mem_gb: Any = "auto"
    # while jobs wait or run, say where they stand this often
    status_every_s: int = 60


ConfigStore.instance().store(group="hydra/launcher", name="transfer_cli_slurm", node=TransferCliSlurmConf,
                             provider="transfer_cli")


class JobFailed(TransferCliError):
    """Raised at the end of a SLURM job whose run failed, so that SLURM records it as FAILED."""


class SlurmLauncher(BaseSubmititLauncher):
    _EXECUTOR = "slurm"

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: Dict[type, Singleton]) -> JobReturn:
        """Inside the SLURM job: run it; a failure (failed.json written by this attempt) fails the job."""
        from transfer_cli.engine.sweep import FAILED

        started = time.time() - 1.0  # mtime granularity
        ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        failed = Path(str(ret.hydra_cfg.hydra.runtime.output_dir)) / FAILED
        if ret.status == JobStatus.FAILED or (failed.exists() and failed.stat().st_mtime >= started):
            error = json.loads(failed.read_text())["error"] if failed.exists() else str(ret._return_value)
            raise JobFailed(f"{failed.parent}: {error}")
        return ret

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        try:
            return self._launch(job_overrides, initial_job_idx)
        except TransferCliError as err:  # the launcher runs inside Hydra, outside the CLI's error handling
            print(f"transfer-cli: error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    def _launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        from transfer_cli.engine import slurm_queue, slurm_resources

        assert self.config is not None
        params = {k: v for k, v in self.params.items() if k not in OWN_KEYS}
        params, partition = slurm_resources.fit_request(params, slurm_resources.read_partitions())
        params["signal_delay_s"], note = slurm_resources.fit_signal_delay(params["timeout_min"],
                                                                           params["signal_delay_s"])
        if note:
            print(f"transfer-cli: {note}", file=sys.stderr)

        executor = submitit.AutoExecutor(cluster="slurm", folder=params.pop("submitit_folder"),
                                         slurm_max_num_timeout=params.pop("max_num_timeout"))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in shared else f"slurm_{k}": v for k, v in params.items()})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))

        numbers = range(initial_job_idx, initial_job_idx + len(job_overrides))
        started = time.time() - 1.0
        arguments = [(list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", Singleton.get_state())
                     for o, n in zip(job_overrides, numbers)]
        try:
            jobs = executor.map_array(self, *zip(*arguments))
        except Exception as err:  # noqa: BLE001 - sbatch's refusal, whatever its form, is one line
            lines = [line for line in str(err).splitlines() if "error" in line.lower()] or str(err).splitlines()
            raise TransferCliError(f"sbatch refused the sweep: {lines[-1].strip() if lines else err}") from None
        array = jobs[0].job_id.split("_")[0]
        print(f"transfer-cli: submitted {len(jobs)} job(s) as SLURM job {array} to partition {partition.name!r}: "
              f"{params['cpus_per_task']} CPUs, {params['mem_gb']} GB, {params.get('gpus_per_node') or 'no'} GPU(s), "
              f"{params['timeout_min']} min each", file=sys.stderr)
        for n, overrides in zip(numbers, job_overrides):
            print(f"\t#{n} : {' '.join(filter_overrides(overrides))}", file=sys.stderr)
        watch = slurm_queue.wait_for(jobs, float(self.params.get("status_every_s", 60)))
        return [self._outcome(job, list(o), n, watch, started) for job, o, n in zip(jobs, job_overrides, numbers)]

    def _outcome(self, job: Any, overrides: List[str], number: int, watch: Any, started: float) -> JobReturn:
        """The job's JobReturn; a failed job is recorded in its failed.json and counted as done."""
        import submitit

        from transfer_cli.engine.sweep import FAILED, record_failure

        deadline = time.monotonic() + RESULT_WAIT_S  # a shared file system may show the result late
        while not job.paths.result_pickle.exists() and time.monotonic() < deadline:
            time.sleep(1)
        if job.paths.result_pickle.exists():  # without it, submitit would wait for sacct (forever, without accounting)
            try:
                return job.results()[0]
            except submitit.core.utils.FailedJobError:  # the job raised: its run failed, failed.json says why
                pass
        run_dir = self._job_dir(overrides, number)
        failed = run_dir / FAILED
        if not (failed.exists() and failed.stat().st_mtime >= started):  # it ended before it could say why
            record_failure(run_dir, TransferCliError(f"SLURM job {job.job_id} ended ({watch.state(job.job_id)}) "
                                                     f"without a result; its log: {job.paths.stderr}"))
        print(f"transfer-cli: job failed: {run_dir} (SLURM job {job.job_id})", file=sys.stderr)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=None)

    def _job_dir(self, overrides: List[str], number: int) -> Path:
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = number
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
