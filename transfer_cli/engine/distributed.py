"""Data-parallel training over processes: `torchrun --nproc_per_node=N -m transfer_cli train ...`.

torchrun starts N copies of the command and tells each its place (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT). Each process trains the same model on its own disjoint share of every epoch
(the loaders' shard), PyTorch's DistributedDataParallel averages the gradients (gloo on CPU, NCCL on
GPUs), evaluation is sharded too and its sums are added over processes, and only rank 0 writes
files. `trainer.batch_size` is per process, the DDP convention: the global batch is N times larger.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op that describes one process,
so the training loop has one code path.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from transfer_cli.errors import TransferCliError

if TYPE_CHECKING:
    from transfer_cli.engine.metrics import Tally


@dataclass(frozen=True)
class Place:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launched() -> bool:
    """True in a process started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def place() -> Place:
    if not dist.is_available() or not dist.is_initialized():
        return Place()
    return Place(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_main() -> bool:
    """The process that writes files (rank 0)."""
    return place().rank == 0


def hydra_args(args: Sequence[str]) -> tuple[list[str], Optional[str]]:
    """The `train` arguments for this process, and a scratch folder to remove afterwards (or None).

    Every process runs the Hydra app, and each would resolve `${now:...}` in hydra.run.dir on its own
    clock, a second apart at times. So rank 0 alone gets the real run folder (with .hydra/ and the
    log); the others run Hydra in a scratch folder that gets no output and learn rank 0's folder by
    broadcast once the process group is up (see `init`).
    """
    args = list(args)
    if any(a in ("-m", "--multirun") for a in args):
        raise TransferCliError("a torchrun launch trains one run; for a sweep, start one torchrun per run "
                               "(without -m)")
    if int(os.environ.get("RANK", "0")) == 0:
        return args, None
    scratch = tempfile.mkdtemp(prefix=f"transfer-cli-rank{os.environ['RANK']}-")
    mine = [a for a in args if not a.startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    return [*mine, f"hydra.run.dir={scratch}", "hydra.output_subdir=null", "hydra/job_logging=disabled",
            "hydra/hydra_logging=disabled"], scratch


def init(device: str) -> str:
    """Join torchrun's process group; returns the device this process trains on.

    A CUDA device becomes cuda:LOCAL_RANK (one GPU per process) with NCCL; a CPU uses gloo.
    """
    for key in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise TransferCliError(f"WORLD_SIZE is set but {key} is not; start data-parallel runs with "
                                   "torchrun --nproc_per_node=N -m transfer_cli train ...")
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise TransferCliError(f"process {local_rank} of this node has no GPU ({torch.cuda.device_count()} "
                                   "visible); use --nproc_per_node at most the number of GPUs")
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if place().world_size > 1:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """Rank 0's value, on every process (any picklable object)."""
    if place().world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_processes(values: Mapping[str, Any], device: torch.device) -> dict[str, float]:
    """Each value (a number or a 0-d tensor) summed over the processes, as floats (float64 on the wire)."""
    names = list(values)
    flat = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=device).reshape(()).detach()
                        for n in names]) if names else torch.zeros(0, dtype=torch.float64, device=device)
    if place().world_size > 1 and names:
        dist.all_reduce(flat)
    return dict(zip(names, flat.tolist()))


def merge_evaluation(counts: "Tally", device: torch.device) -> "Tally":
    """The whole split's sums from each process's evaluation of its shard (`evaluate.tally`), in place."""
    if place().world_size > 1:
        for tensor in counts.sums():
            dist.all_reduce(tensor)
    return counts


def shard(loaders: Sequence[Any], train: Any) -> None:
    """Give this process its share of each loader: `train` evenly (equal step counts), the others fully."""
    where = place()
    for loader in loaders:
        if not hasattr(loader, "shard"):
            raise TransferCliError(f"data-parallel training needs transfer-cli's own loaders; {type(loader).__name__} "
                                   "cannot be sharded")
        loader.shard(where.rank, where.world_size, even=loader is train)


def wrap_step(step: nn.Module, device: torch.device) -> nn.Module:
    """The training step's module, wrapped in DistributedDataParallel when there are several processes.

    Built anew with every optimizer, since DDP fixes at construction which parameters it averages and
    layer schedules change that between epochs. find_unused_parameters: a routing strategy may leave
    some trainable blocks out of a step's graph.
    """
    if place().world_size == 1:
        return step
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=device_ids, find_unused_parameters=True)


def describe(batch_size: int) -> dict[str, Any]:
    """What results.json records about the processes: their number and the per-process and global batch."""
    world_size = place().world_size
    return {"world_size": world_size, "batch_size": {"per_process": batch_size, "global": batch_size * world_size}}
