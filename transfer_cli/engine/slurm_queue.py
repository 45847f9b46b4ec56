"""Waiting for a SLURM sweep's jobs: say why they wait, and learn how each one ended.

submitit waits for a job's result file and polls sacct for its state. Where the cluster keeps no
job accounting (no slurmdbd, as on many small clusters) sacct fails on every poll, submitit logs
"Bypassing sacct error" each time, and a job killed without a result (out of memory, cancelled) is
waited for forever. Here squeue gives each job's state and the queue's reason for a pending one
(squeue %r) while the controller knows the job, sacct its final state once it has left, if the
cluster has accounting (said once if not), and a job that has ended without a result is over.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from typing import Any, Callable, Sequence

# squeue states of a job that will still run (or is running); anything else has ended
WAITING = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING",
           "SUSPENDED", "STOPPED", "PREEMPTED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}
# what a pending job's reason means for someone watching the sweep
REASONS = {
    "Resources": "waiting for free CPUs, memory or GPUs",
    "Priority": "other jobs go first",
    "JobArrayTaskLimit": "hydra.launcher.array_parallelism jobs run at once",
    "PartitionConfig": "asks for more than the partition's nodes have: it will never start",
    "PartitionTimeLimit": "its time limit is above the partition's: it will never start",
    "PartitionNodeLimit": "asks for more nodes than the partition allows: it will never start",
    "ReqNodeNotAvail": "the nodes it needs are down or reserved",
    "PartitionDown": "the partition is down",
    "BeginTime": "requeued, starts again shortly",
}


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


class QueueWatch:
    """The states of a set of SLURM jobs (submitit ids: "123" or "123_4"), asked of the cluster as a batch."""

    def __init__(self, job_ids: Sequence[str], say: Callable[[str], None] = to_stderr):
        self.job_ids = list(job_ids)
        self.say = say
        self.states: dict[str, tuple[str, str]] = {}  # job id -> (state, reason)
        self._no_accounting_said = False

    def refresh(self) -> None:
        arrays = sorted({job_id.split("_")[0] for job_id in self.job_ids})
        done = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-j", ",".join(arrays), "-o", "%i|%T|%r"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode and "Invalid job id" not in done.stderr:  # no answer this time: keep what is known
            return
        seen = {}
        for line in done.stdout.splitlines():
            job_id, state, reason = (line.strip().split("|") + ["", ""])[:3]
            seen[job_id] = (state, reason)
        for job_id in self.job_ids:
            if job_id in seen:
                self.states[job_id] = seen[job_id]
            elif self.states.get(job_id, ("PENDING",))[0] in WAITING:
                self.states[job_id] = (self._accounted_state(job_id), "")

    def _accounted_state(self, job_id: str) -> str:
        """The state of a job squeue no longer shows: sacct's, or UNKNOWN where there is no accounting."""
        done = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], capture_output=True,
                              text=True, timeout=120)
        if done.returncode == 0 and done.stdout.strip():
            return done.stdout.split()[0].upper()
        if not self._no_accounting_said:
            why = (done.stderr or done.stdout).strip().splitlines()
            self.say(f"transfer-cli: SLURM job accounting is not available here (sacct: {why[0] if why else 'no record'}); "
                     "a job that has left the queue without a result is counted as ended")
            self._no_accounting_said = True
        return "UNKNOWN"

    def ended(self, job_id: str) -> bool:
        return self.states.get(job_id, ("PENDING", ""))[0] not in WAITING

    def state(self, job_id: str) -> str:
        return self.states.get(job_id, ("UNKNOWN", ""))[0]

    def summary(self, job_ids: Sequence[str]) -> str:
        """"2 running, 1 pending (Resources: waiting for free CPUs, memory or GPUs)"."""
        counts = Counter()
        for job_id in job_ids:
            state, reason = self.states.get(job_id, ("UNKNOWN", ""))
            if state == "PENDING" and reason and reason != "None":
                counts[f"pending ({reason}: {REASONS[reason]})" if reason in REASONS else f"pending ({reason})"] += 1
            else:
                counts[state.lower()] += 1
        return ", ".join(f"{n} {what}" for what, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def wait_for(jobs: Sequence[Any], every_s: float, say: Callable[[str], None] = to_stderr,
             poll_s: float = 2.0) -> QueueWatch:
    """Wait until every submitit job has a result file or has ended; say where they stand every `every_s`
    seconds (and at the first poll), with the queue's reason for the ones that wait."""
    watch = QueueWatch([job.job_id for job in jobs], say)
    last_said = -float("inf")
    while True:
        watch.refresh()
        remaining = [job for job in jobs if not job.paths.result_pickle.exists() and not watch.ended(job.job_id)]
        if not remaining:
            return watch
        if time.monotonic() - last_said >= every_s:
            array = remaining[0].job_id.split("_")[0]
            say(f"transfer-cli: waiting for {len(remaining)} of {len(jobs)} SLURM jobs (job {array}): "
                f"{watch.summary([job.job_id for job in remaining])}")
            last_said = time.monotonic()
        time.sleep(poll_s)
