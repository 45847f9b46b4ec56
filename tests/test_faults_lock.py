"""One writer per run folder, with real second processes: a live holder refuses, a killed one does not
block, a requeued SLURM job waits for its own previous attempt, and two runs / two sweeps in one
folder through the CLI."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from transfer_cli.cli import main
from transfer_cli.engine.run_lock import LOCK_FILE, RunFolderHeld, hold_run_folder

ROOT = Path(__file__).resolve().parent.parent
HOLD = ("import sys; from pathlib import Path; from transfer_cli.engine.run_lock import hold_run_folder\n"
        "with hold_run_folder(Path(sys.argv[1])):\n    print('held', flush=True); sys.stdin.read()\n")


def env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def start_holder(folder: Path, **extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env(**extra))
    assert proc.stdout.readline().strip() == "held"
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def test_a_live_holder_refuses_and_a_killed_one_does_not_block(tmp_path):
    holder = start_holder(tmp_path)
    try:
        with pytest.raises(RunFolderHeld) as refused:
            with hold_run_folder(tmp_path):
                pass
        message = str(refused.value)
        assert "\n" not in message
        assert message.startswith(f"{tmp_path} is in use by another run (pid {holder.pid} on "
                                  f"{socket.gethostname()}, since ")
    finally:
        stop(holder)  # SIGKILL: no cleanup ran, the lock file is still there
    assert (tmp_path / LOCK_FILE).exists()
    with hold_run_folder(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_requeued_slurm_job_waits_for_its_previous_attempt_only(tmp_path, monkeypatch):
    holder = start_holder(tmp_path, SLURM_JOB_ID="4242")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "77")  # another job: refused at once
        with pytest.raises(RunFolderHeld, match=f"pid {holder.pid} .*, SLURM job 4242\\)"):
            with hold_run_folder(tmp_path):
                pass
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # the same job, requeued: its old attempt exits in 1 s
        threading.Timer(1.0, holder.stdin.close).start()
        started = time.monotonic()
        with hold_run_folder(tmp_path):
            assert time.monotonic() - started >= 0.9
            assert json.loads((tmp_path / LOCK_FILE).read_text())["slurm_job"] == "4242"
    finally:
        stop(holder)


# ---- through the CLI: a real training process holds the folder ---------------------------------
ENDLESS = ["trainer=smoke", "trainer.device=cpu", "trainer.num_threads=1"]


def start_training(args: list[str], folder: Path, pattern: str = ".") -> subprocess.Popen:
    """A `transfer-cli train` process; returns once it holds the run folder `folder`/`pattern`."""
    proc = subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *args], env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            locks = folder.glob(f"{pattern}/{LOCK_FILE}")
            if any(json.loads(lock.read_text())["pid"] == proc.pid for lock in locks):
                return proc
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.2)
    stop(proc)
    raise AssertionError(f"the training process never held {folder}/{pattern}: {proc.stderr.read()[-2000:]}")


@pytest.mark.slow
def test_a_second_run_in_a_live_runs_folder_is_refused_in_one_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    first = start_training([*ENDLESS, "trainer.max_epochs=100000", f"hydra.run.dir={run_dir}"], run_dir)
    try:
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *ENDLESS, "trainer.resume=true", f"hydra.run.dir={run_dir}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1
        assert err[0].startswith(f"transfer-cli: error: {run_dir} is in use by another run (pid {first.pid} on ")
    finally:
        stop(first)
    # killed: its lock is gone with it, and the run resumes (one epoch asked: it only tests)
    main(["train", *ENDLESS, "trainer.resume=true", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"])
    assert (run_dir / "results.json").exists()


@pytest.mark.slow
def test_two_sweeps_in_one_folder_share_the_jobs(tmp_path, capsys):
    sweep = ["train", "-m", *ENDLESS, "trainer.max_epochs=100000,1", f"hydra.sweep.dir={tmp_path}"]
    first = start_training(sweep[1:], tmp_path, "*max_epochs=100000*")  # runs the long job first
    try:
        main(sweep)  # the second sweep: skips the job the first one is running, runs the other
        out = capsys.readouterr().out
        # job folders are named by their overrides
        (long_job,) = tmp_path.glob("*max_epochs=100000*")
        (short_job,) = [p for p in tmp_path.glob("*max_epochs=1*") if p != long_job]
        assert f"skipped, {long_job} is in use by another run (pid {first.pid} on " in out
        assert json.loads((short_job / "results.json").read_text())["epochs"] == 1
        assert not (long_job / "failed.json").exists() and not (long_job / "results.json").exists()
    finally:
        stop(first)
