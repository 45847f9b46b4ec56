"""One writer per run folder: a run holds an exclusive lock on `<run folder>/.lock` while it works there.

Two processes training into one folder (the same hydra.run.dir, or two sweeps with the same
hydra.sweep.dir) would interleave their checkpoints and metrics. The lock is `fcntl.flock` on a file
in the folder, so the kernel drops it when its process ends, however it ends: a lock left by a
killed run never blocks the next one. The file says who holds it (pid, host, since when, SLURM
job), for the refusal's one line; it is never removed, since removing it would let two processes
lock two different files. On NFS (v4) Linux turns flock into a lock the server sees, so processes on
different hosts exclude each other too.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Iterator

from transfer_cli.errors import TransferCliError
from transfer_cli.io import reported_disk_faults

LOCK_FILE = ".lock"
# a requeued SLURM job may start while its previous attempt is still exiting: wait that long for it
SAME_JOB_WAIT_S = 60.0
# errors of file systems without flock (some Lustre and old NFS mounts)
NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


class RunFolderHeld(TransferCliError):
    """Another live process holds the run folder."""


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": datetime.now().isoformat(timespec="seconds"),
            "slurm_job": os.environ.get("SLURM_JOB_ID")}


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for the duration of the block, or raise RunFolderHeld naming the live holder."""
    path = Path(run_dir) / LOCK_FILE
    with reported_disk_faults(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if _lock(fd, path):
            record = json.dumps(_me()).encode()
            with reported_disk_faults(path):
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock(fd: int, path: Path) -> bool:
    """Take the lock (True); False where the file system has no flock (the run goes on, unguarded)."""
    deadline = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _holder(fd)
            same_job = holder.get("slurm_job") and holder.get("slurm_job") == os.environ.get("SLURM_JOB_ID")
            deadline = deadline or time.monotonic() + SAME_JOB_WAIT_S
            if not same_job or time.monotonic() > deadline:
                raise RunFolderHeld(_refusal(path.parent, holder)) from None
            time.sleep(0.5)  # this job's previous attempt, requeued by SLURM, is still exiting
        except OSError as err:
            if err.errno not in NO_FLOCK:
                raise
            print(f"transfer-cli: warning: {path.parent} cannot be locked ({os.strerror(err.errno)}: the file system "
                  "has no flock); nothing stops a second process from writing into it", file=sys.stderr)
            return False


def _holder(fd: int) -> dict:
    """What the holder wrote into the lock file; it may be a moment late writing it."""
    for _ in range(10):
        try:
            record = json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
        time.sleep(0.1)
    return {}


def _refusal(run_dir: Path, holder: dict) -> str:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
    if holder.get("slurm_job"):
        who += f", SLURM job {holder['slurm_job']}"
    return (f"{run_dir} is in use by another run ({who}); wait for it to finish or stop it, "
            "or write to another folder (hydra.run.dir=... / hydra.sweep.dir=...)")

