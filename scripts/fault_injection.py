"""SIGKILL a run at random moments, resume it after each kill, and check that it ends with exactly the
numbers of a run left alone; then kill a sweep at random and check that re-running it in the same
folder runs only what is missing.

    python scripts/fault_injection.py                 # 20 kills of one run, then 2 of a 3-job sweep
    python scripts/fault_injection.py --kills 40 --seed 1

Every run is a real `python -m transfer_cli train` process, killed with SIGKILL (no handler runs, no
checkpoint is written on the way out). A quarter of the kills are aimed at checkpoint writes (the
moment the temporary file beside last.pt appears), the first one inside the first epoch; a quarter land
at a random time of the start-up (imports, data, model); half at a random time of training, up to
four steps after the attempt's first checkpoint, so that the run moves on through its epochs. After
each kill last.pt must load and metrics.jsonl must be a prefix of the uninterrupted run's; at the end
results.json (test metrics, best epoch), the best weights' checksum and every epoch's metrics line
(timings left out) must equal the uninterrupted run's. The last lines are `N/N resumed identical` and the sweep's verdict.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# smoke-sized: 8 epochs of 6 steps, a checkpoint after every step, dropout and augmentation
RUN = ["trainer=smoke", "trainer.device=cpu", "trainer.num_threads=1", "trainer.batch_size=4",
       "trainer.max_train_batches=6", "trainer.max_epochs=8", "trainer.checkpoint_every=1",
       "backbone.drop_rate=0.3", "data.augment=true"]
TIMINGS = {"epoch_time_s", "train_samples_per_s", "val_time_s"}


def command(*overrides: str) -> list[str]:
    multirun = [o for o in overrides if o == "-m"]  # Hydra takes it before the overrides
    return [sys.executable, "-m", "transfer_cli", "train", *multirun, *RUN, *[o for o in overrides if o != "-m"]]


def start(*overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(command(*overrides), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def finish(*overrides: str) -> None:
    process = start(*overrides)
    _, err = process.communicate()
    if process.returncode:
        sys.exit(f"fault_injection: the run failed (exit {process.returncode}):\n{err}")


def kill(process: subprocess.Popen) -> bool:
    """SIGKILL the run's process group; False if it had already ended."""
    if process.poll() is not None:
        return False
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return True


def kill_at_random(process: subprocess.Popen, delay: float) -> bool:
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        return kill(process)


def kill_in_training(process: subprocess.Popen, last: Path, delay: float, limit_s: float) -> bool:
    """Kill `delay` seconds after this attempt wrote its first checkpoint (training has begun)."""
    before = last.stat().st_mtime_ns if last.exists() else None
    deadline = time.monotonic() + limit_s
    while process.poll() is None and time.monotonic() < deadline:
        if last.exists() and last.stat().st_mtime_ns != before:
            return kill_at_random(process, delay)
        time.sleep(0.005)
    return kill(process)


def kill_inside_a_write(process: subprocess.Popen, checkpoints: Path, limit_s: float) -> bool:
    """Kill the moment a temporary checkpoint file appears (a write has begun, the rename not yet done)."""
    def temporary() -> set[str]:
        return {p.name for p in checkpoints.iterdir() if p.name.endswith(".tmp")} if checkpoints.is_dir() else set()

    left = temporary()  # by the writes earlier kills cut short
    deadline = time.monotonic() + limit_s
    while process.poll() is None and time.monotonic() < deadline:
        if temporary() - left:
            return kill(process)
        time.sleep(0.001)
    return kill(process)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # a torn last line is the loop's to cut off
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines if line.strip()]


def weights_checksum(run_dir: Path) -> str:
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].numpy().tobytes())
    return digest.hexdigest()


def outcome(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {"test": results["test"], "best_epoch": results["best_epoch"], "weights": weights_checksum(run_dir),
            "metrics": metrics(run_dir)}


def position(run_dir: Path) -> str:
    """Where last.pt stands after a kill (it must load)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return "no checkpoint yet"
    saved = torch.load(last, weights_only=True)
    state = saved["train_state"]
    inside = f", batch {saved['mid_epoch']['tally']['batches']}" if "mid_epoch" in saved else " start"
    return f"epoch {state['epoch']}{inside} (step {state['step']})"


def killed_run(work: Path, kills: int, whole: dict, start_s: float, step_s: float, rng: random.Random) -> int:
    """Kill a run `kills` times, resuming after each; `kills` if it then ended identically, else 0."""
    run_dir = work / "killed"
    checkpoints = run_dir / "checkpoints"
    survived = attempts = 0
    while survived < kills:
        attempts += 1
        if attempts > 4 * kills:
            sys.exit(f"fault_injection: only {survived} of {kills} kills landed before the run finished")
        resume = ["trainer.resume=true"] if (run_dir / ".hydra").exists() else []
        process = start(f"hydra.run.dir={run_dir}", *resume)
        kind = ("in a checkpoint write", "in the start-up", "in training", "in training")[survived % 4]
        limit_s = 4 * start_s + 100 * step_s
        if kind == "in a checkpoint write":  # the first kill: the first write, inside epoch 0
            landed = kill_inside_a_write(process, checkpoints, limit_s)
        elif kind == "in the start-up":
            landed = kill_at_random(process, rng.uniform(0.1, 0.9) * start_s)
        else:
            landed = kill_in_training(process, checkpoints / "last.pt", rng.uniform(0, 4 * step_s), limit_s)
        if not landed:
            if (run_dir / "results.json").exists():
                sys.exit(f"fault_injection: the run finished after {survived} kills; use fewer --kills")
            continue
        survived += 1
        where = position(run_dir)
        done = metrics(run_dir)
        prefix = done == whole["metrics"][:len(done)]
        print(f"kill {survived:2d} ({kind}): last.pt at {where}, "
              f"metrics.jsonl {len(done)} line(s){'' if prefix else ' DIFFER'}", flush=True)
        if not prefix:
            return 0
    finish(f"hydra.run.dir={run_dir}", "trainer.resume=true")
    return kills if outcome(run_dir) == whole else 0


def killed_sweep(work: Path, kills: int, rng: random.Random, train_s: float) -> str:
    """Kill a 3-job sweep `kills` times, each a random moment after one more job finished, then run it again."""
    sweep = work / "sweep"
    overrides = ["-m", "seed=0,1,2", f"hydra.sweep.dir={sweep}"]
    for kill_number in range(kills):
        process = start(*overrides)
        while process.poll() is None and len(list(sweep.glob("*/results.json"))) <= kill_number:
            time.sleep(0.05)
        landed = kill_at_random(process, rng.uniform(0, train_s))
        print(f"sweep kill {kill_number + 1}: {'landed' if landed else 'too late, the sweep had finished'}, "
              f"{len(list(sweep.glob('*/results.json')))}/3 jobs finished", flush=True)
    before = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    finish(*overrides)
    after = {p.parent.name: p.stat().st_mtime_ns for p in sweep.glob("*/results.json")}
    redone = [name for name, mtime in before.items() if after.get(name) != mtime]
    if len(after) != 3 or redone:
        return f"sweep: FAILED ({len(after)}/3 finished; run again: {redone})"
    return (f"sweep: {len(before)}/3 jobs had finished before the re-run and were kept as they were; "
            f"the re-run ran the other {3 - len(before)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--sweep-kills", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="for the kill times")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        started = time.monotonic()
        finish(f"hydra.run.dir={work / 'whole'}")
        wall_s = time.monotonic() - started
        spent = json.loads((work / "whole" / "results.json").read_text())["time"]
        train_s = spent["train_s"] + spent.get("val_s", 0.0)
        start_s = wall_s - train_s - spent.get("test_s", 0.0)
        whole = outcome(work / "whole")
        step_s = train_s / whole["metrics"][-1]["step"]
        print(f"uninterrupted run: {wall_s:.0f} s ({start_s:.0f} s start-up, {train_s:.0f} s training)", flush=True)
        identical = killed_run(work, args.kills, whole, start_s, step_s, rng)
        print(f"{identical}/{args.kills} resumed identical", flush=True)
        if args.sweep_kills:
            print(killed_sweep(work, args.sweep_kills, rng, train_s))
    sys.exit(0 if identical == args.kills else 1)


if __name__ == "__main__":
    main()
