"""Stop signals: SIGTERM (scancel, preemption, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's
pre-limit signal) stop a run after its current step, not in the middle of it, with checkpoints/last.pt
written there, so nothing done is lost and `trainer.resume=true` continues at the next batch.

A second Ctrl-C stops at once (KeyboardInterrupt): the last good checkpoint stays, since every write is
atomic. The exit status is 128 + the signal's number (143, 130, 138), what shells, sweeps and SLURM read
as "ended by that signal". Under submitit (hydra/launcher=slurm) SIGUSR1 is submitit's: after last.pt is
written, its own handler runs, which requeues the job and exits; the requeued job resumes.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any, Optional

from transfer_cli.engine import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Stopped(SystemExit):
    """The run stopped on a signal after writing last.pt; not a failure of the job (a sweep re-run resumes it).
    A SystemExit, so that the sweep's per-job error handling does not record it as failed."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class StopRequests:
    """Catches the stop signals while a run trains (a context manager); the loop asks `requested` after
    each step and at the end of each epoch, writes last.pt, then calls `stop`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.signum: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._caught)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _caught(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: at once
        self.signum = self.signum or signum

    def stop(self, where: str) -> None:
        """Say where the run stopped and how to continue it, hand SIGUSR1 on to submitit, and exit."""
        distributed.barrier()  # every process finished the step; rank 0 has written last.pt
        if distributed.is_main():
            print(f"transfer-cli: stopped by {signal.Signals(self.signum).name} {where}; {self.run_dir}/checkpoints/"
                  f"last.pt holds it: continue with trainer.resume=true hydra.run.dir={self.run_dir} and the run's "
                  "other settings (a sweep: run it again with the same hydra.sweep.dir)", file=sys.stderr, flush=True)
        previous = self._previous.get(self.signum)
        self.__exit__()
        if callable(previous) and self.signum == signal.SIGUSR1:
            previous(self.signum, None)  # submitit: requeue the job (it exits itself)
        raise Stopped(self.signum)
