"""What a SLURM sweep asks for, fitted to the partition and checked against it before anything is submitted.

The launcher's defaults are `auto`: a GPU per job where the partition's nodes have GPUs (none on a
CPU-only partition), 8 CPUs (fewer where the nodes have fewer) and memory in proportion to the CPUs
taken, at most 32 GB. A request the partition cannot meet (GPUs on a CPU-only partition, more CPUs
or memory than any of its nodes has, a time limit above the partition's) is rejected by sbatch or,
worse, pends forever (squeue's reason PartitionConfig); here it is refused in one line saying what
the partition has. A signal delay not well below the time limit would signal the job soon after it
starts, and the job would requeue in a loop: it is corrected, in one line.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Any, Optional

from transfer_cli.errors import TransferCliError

AUTO_CPUS, AUTO_MEM_GB = 8, 32
SIGNAL_SLACK_S, MIN_SIGNAL_DELAY_S = 60, 10


@dataclass(frozen=True)
class Nodes:
    """A group of a partition's nodes that look alike to SLURM (one line of sinfo)."""

    cpus: int
    memory_gb: int
    gpus: int

    def describe(self) -> str:
        return f"{self.cpus} CPUs, {self.memory_gb} GB, " + (f"{self.gpus} GPUs" if self.gpus else "no GPU")


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    nodes: tuple[Nodes, ...]
    max_minutes: Optional[int]  # None: no limit

    def describe(self) -> str:
        return "; ".join(sorted({n.describe() for n in self.nodes}))


def read_partitions() -> dict[str, Partition]:
    """The cluster's partitions, from sinfo (one line per partition and kind of node)."""
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P|%c|%m|%G|%l"], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise TransferCliError("sinfo not found: hydra/launcher=slurm submits from a SLURM login node, "
                               "where sbatch, squeue and sinfo work") from None
    if done.returncode:
        raise TransferCliError(f"sinfo failed, is SLURM reachable from here? {done.stderr.strip() or done.stdout}")
    return parse_sinfo(done.stdout)


def parse_sinfo(text: str) -> dict[str, Partition]:
    rows: dict[str, list] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, cpus, memory, gres, limit = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        nodes = Nodes(int(cpus.rstrip("+")), int(memory.rstrip("+")) // 1024, gpu_count(gres))
        entry = rows.setdefault(name, [default, [], minutes(limit)])
        entry[1].append(nodes)
    return {name: Partition(name, default, tuple(nodes), limit) for name, (default, nodes, limit) in rows.items()}


def gpu_count(gres: str) -> int:
    """GPUs per node from sinfo's %G: "(null)", "gpu:4", "gpu:a100:4(S:0-1),shard:8"."""
    total = 0
    for item in gres.split(","):
        found = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if found:
            total += int(found.group(1))
    return total


def minutes(limit: str) -> Optional[int]:
    """sinfo's time limit ("infinite", "30:00", "4:00:00", "2-00:00:00") in minutes."""
    if limit in ("infinite", "n/a", "UNLIMITED"):
        return None
    days, _, clock = limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    hours, mins, secs = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 24 * 60 + hours * 60 + mins + (1 if secs else 0)


def fit_request(params: dict[str, Any], partitions: dict[str, Partition]) -> tuple[dict[str, Any], Partition]:
    """The launcher's parameters with `auto` filled in for the partition; a request it cannot meet is an error."""
    name = params.get("partition")
    if name is None:
        defaults = [p for p in partitions.values() if p.default]
        if not defaults:
            raise TransferCliError(f"the cluster has no default partition; set hydra.launcher.partition to one of: "
                                   f"{', '.join(partitions)}")
        partition = defaults[0]
    elif name not in partitions:
        raise TransferCliError(f"hydra.launcher.partition={name!r} is not a partition of this cluster; choose one of: "
                               f"{', '.join(partitions)} (sinfo)")
    else:
        partition = partitions[name]
    fitted = dict(params)
    tasks = int(params.get("tasks_per_node") or 1)
    gpus = _gpus(params.get("gpus_per_node"), partition)
    cpus = _cpus(params.get("cpus_per_task"), partition, gpus, tasks)
    mem = _memory(params.get("mem_gb"), partition, gpus, cpus * tasks)
    fitted.update(gpus_per_node=gpus or None, cpus_per_task=cpus, mem_gb=mem)
    limit = int(params["timeout_min"])
    if partition.max_minutes is not None and limit > partition.max_minutes:
        raise TransferCliError(f"hydra.launcher.timeout_min={limit} is above the time limit of partition "
                               f"{partition.name!r}, {partition.max_minutes} min: the jobs would never start; set "
                               f"hydra.launcher.timeout_min={partition.max_minutes} or less")
    return fitted, partition


def _fail(partition: Partition, asked: str, fix: str) -> TransferCliError:
    return TransferCliError(f"{asked}, but partition {partition.name!r} has no node with that ({partition.describe()}): "
                            f"sbatch would refuse the jobs or they would pend forever; {fix}, or choose another "
                            "partition (hydra.launcher.partition=...)")


def _gpus(value: Any, partition: Partition) -> int:
    most = max(n.gpus for n in partition.nodes)
    if value == "auto":
        return 1 if most else 0
    gpus = int(value or 0)
    if gpus > most:
        raise _fail(partition, f"hydra.launcher.gpus_per_node={gpus}",
                    "set hydra.launcher.gpus_per_node=0 to run on CPUs" if not most else
                    f"ask for hydra.launcher.gpus_per_node={most} or fewer")
    return gpus


def _cpus(value: Any, partition: Partition, gpus: int, tasks: int) -> int:
    fitting = [n for n in partition.nodes if n.gpus >= gpus]
    most = max(n.cpus for n in fitting) // tasks
    if value == "auto":
        return max(min(AUTO_CPUS, most), 1)
    cpus = int(value or 1)
    if cpus > most:
        raise _fail(partition, f"hydra.launcher.cpus_per_task={cpus}" + (f" x {tasks} tasks" if tasks > 1 else ""),
                    f"ask for hydra.launcher.cpus_per_task={most} or fewer")
    return cpus


def _memory(value: Any, partition: Partition, gpus: int, cpus: int) -> Optional[int]:
    fitting = [n for n in partition.nodes if n.gpus >= gpus and n.cpus >= cpus]
    if value == "auto":  # the memory that goes with the CPUs taken, as a share of the node
        return max(min(AUTO_MEM_GB, max(n.memory_gb * cpus // n.cpus for n in fitting)), 1)
    if value is None:
        return None
    mem = int(value)
    most = max(n.memory_gb for n in fitting)
    if mem > most:
        raise _fail(partition, f"hydra.launcher.mem_gb={mem}", f"ask for hydra.launcher.mem_gb={most} or less")
    return mem


def fit_signal_delay(timeout_min: int, signal_delay_s: int) -> tuple[int, Optional[str]]:
    """The signal delay, corrected where the job could get the signal in the first half of its time
    limit, and a line saying so. SLURM sends it up to SIGNAL_SLACK_S seconds earlier than asked (sbatch
    --signal: "due to the resolution of event handling"), so the delay must be that much below half
    the limit; it stays at least MIN_SIGNAL_DELAY_S, since a delay of 0 may not signal at all."""
    limit_s, delay = int(timeout_min) * 60, int(signal_delay_s)
    most = limit_s // 2 - SIGNAL_SLACK_S
    if delay <= max(most, MIN_SIGNAL_DELAY_S):
        return delay, None
    fitted = max(most, MIN_SIGNAL_DELAY_S)
    note = (f"hydra.launcher.signal_delay_s={delay} is not well below timeout_min={timeout_min} ({limit_s} s): SLURM "
            f"signals up to {SIGNAL_SLACK_S} s earlier than asked, so the jobs could be signalled soon after they "
            f"start and requeue in a loop; using signal_delay_s={fitted}")
    if most < MIN_SIGNAL_DELAY_S:
        note += " (still little time before the signal: raise timeout_min)"
    return fitted, note
