"""Mid-epoch checkpoints (trainer.checkpoint_every) and stop signals: a run stopped inside an epoch
resumes at the next batch and ends with exactly the numbers of an uninterrupted run. The runs draw
global random numbers (dropout) and augmentation draws, so restoring the random state is exercised."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.engine.mid_epoch import parse_every
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from tests.test_cli import SMOKE

# 2 epochs of 6 steps, dropout and batch augmentation: a stop at step 3 or 9 lands inside an epoch
RUN = [*SMOKE, "trainer.batch_size=4", "trainer.max_train_batches=6", "backbone.drop_rate=0.3", "data.augment=true"]


def weights_checksum(run_dir: Path) -> str:
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].cpu().numpy().tobytes())
    return digest.hexdigest()


def same_numbers(run_dir: Path, whole: Path) -> None:
    """What must be equal after a resume: the test metrics, the best epoch, the weights, every epoch's line."""
    resumed, expected = (json.loads((d / "results.json").read_text()) for d in (run_dir, whole))
    assert resumed["test"] == expected["test"]
    assert resumed["best_epoch"] == expected["best_epoch"]
    assert weights_checksum(run_dir) == weights_checksum(whole)
    drop = {"epoch_time_s", "train_samples_per_s", "val_time_s"}
    lines = [[{k: v for k, v in r.items() if k not in drop} for r in read_jsonl(d / "metrics.jsonl")]
             for d in (run_dir, whole)]
    assert lines[0] == lines[1]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("whole")
    main(["train", *RUN, f"hydra.run.dir={run_dir}"])
    return run_dir


def signal_at_step(monkeypatch, step: int, signum: int) -> list[int]:
    """Send `signum` to this process while optimizer step `step` runs (counted from 1); return the steps run."""
    steps: list[int] = []
    original = Trainer.train_step

    def train_step(self, batch, state):
        if state.step + 1 == step:
            os.kill(os.getpid(), signum)
        steps.append(state.step + 1)
        return original(self, batch, state)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    return steps


@pytest.mark.parametrize("value, parsed", [("500", (500, None)), (500, (500, None)), ("10min", (None, 600.0)),
                                           ("90s", (None, 90.0)), ("1h", (None, 3600.0)), (None, (None, None)),
                                           (0, (None, None))])
def test_checkpoint_every_takes_steps_or_a_wall_time(value, parsed):
    assert parse_every(value) == parsed


@pytest.mark.parametrize("value", ["-5", "ten", "10 days", "2.5"])
def test_a_checkpoint_every_that_is_neither_is_one_line(value):
    with pytest.raises(TransferCliError, match="trainer.checkpoint_every=.*give optimizer steps"):
        parse_every(value)


@pytest.mark.slow
@pytest.mark.parametrize("signum, step, where", [
    (signal.SIGTERM, 3, "at step 3 (epoch 0, batch 3 of 6)"), (signal.SIGINT, 9, "at step 9 (epoch 1, batch 3 of 6)"),
    (signal.SIGUSR1, 6, "after epoch 0")],  # in the last step of an epoch: its end, validated, is saved
    ids=["SIGTERM-epoch0", "SIGINT-epoch1", "SIGUSR1-epoch-end"])
def test_a_stop_signal_finishes_the_step_writes_last_pt_and_the_resume_is_exact(whole, tmp_path, monkeypatch,
                                                                                signum, step, where, capsys):
    run_dir = tmp_path / "run"
    handler = signal.getsignal(signum)
    steps = signal_at_step(monkeypatch, step, signum)
    with pytest.raises(SystemExit) as stopped:
        main(["train", *RUN, f"hydra.run.dir={run_dir}"])
    assert stopped.value.code == 128 + signum
    assert steps[-1] == step  # the step in which the signal came was finished, no other began
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"transfer-cli: stopped by {signal.Signals(signum).name} {where}; ")
    assert f"continue with trainer.resume=true hydra.run.dir={run_dir}" in err[0]
    assert not (run_dir / "results.json").exists()
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["train_state"]["step"] == step
    assert signal.getsignal(signum) == handler  # put back
    monkeypatch.undo()
    main(["train", *RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    same_numbers(run_dir, whole)


@pytest.mark.slow
def test_mid_epoch_checkpoints_every_n_steps_resume_exactly_after_a_crash(whole, tmp_path, monkeypatch):
    """trainer.checkpoint_every=2: a crash at step 5 (no signal, no chance to save) resumes from step 4."""
    run_dir = tmp_path / "run"
    original = Trainer.train_step

    def crash_at_5(self, batch, state):
        if state.step == 4:
            raise RuntimeError("power cut")
        return original(self, batch, state)

    monkeypatch.setattr(Trainer, "train_step", crash_at_5)
    with pytest.raises(SystemExit):  # Hydra reports the crash and exits 1
        main(["train", *RUN, f"hydra.run.dir={run_dir}", "trainer.checkpoint_every=2"])
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["train_state"]["step"] == 4 and saved["mid_epoch"]["tally"]["batches"] == 4
    cut_short = run_dir / "checkpoints" / ".last.pt.x1y2.tmp"  # what a kill inside a write leaves
    cut_short.write_bytes(b"half a checkpoint")
    monkeypatch.undo()
    main(["train", *RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    same_numbers(run_dir, whole)
    assert not cut_short.exists()


def wait_for_line(process: subprocess.Popen, text: str) -> None:
    for line in process.stdout:
        if line.strip() == text:
            return
    raise AssertionError(f"the process ended before printing {text!r}: {process.stderr.read()}")


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_the_last_good_checkpoint_stays(tmp_path):
    """A real process: the first SIGINT asks for a stop after the step; a second one during the
    checkpoint write (slowed down here) stops at once, and the previous last.pt is still whole."""
    run_dir = tmp_path / "run"
    slow_save = tmp_path / "sitecustomize.py"
    slow_save.write_text(  # every last.pt write takes 3 s, so the second SIGINT lands inside one
        "import time, transfer_cli.engine.checkpoint as c\n"
        "save = c.Checkpoints.save_last\n"
        "def slow(self, state):\n"
        "    print('saving', flush=True); time.sleep(3); save(self, state)\n"
        "c.Checkpoints.save_last = slow\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *RUN, f"hydra.run.dir={run_dir}",
                                "trainer.max_epochs=30"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for_line(process, "saving")  # the end of epoch 0
    time.sleep(3.5)
    first = (run_dir / "checkpoints" / "last.pt").read_bytes()
    wait_for_line(process, "saving")  # the end of epoch 1: inside its write
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0 and "KeyboardInterrupt" in err
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == first
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["train_state"]["epoch"] == 1
