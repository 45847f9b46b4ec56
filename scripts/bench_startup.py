"""Start-up cost of a CI smoke run: the wall time of `transfer-cli train trainer=smoke` against
`python -c "import torch"`, both as fresh processes on this machine, and their ratio (target <= 2.0).

    python scripts/bench_startup.py                                  # the transfer_cli this Python imports
    python scripts/bench_startup.py --tree before=/work/main --tree after=.   # several source trees, one run

Each repeat runs every command once, in turn (torch, then each tree's smoke run), so a change in the
machine's load touches all of them alike; the figure is the median over repeats. A tree is put first
on PYTHONPATH, so `--tree` compares checkouts with the same virtual environment. One warm-up round
(not counted) fills the file cache. The last line is `ratio smoke/import torch = <x>` for the last
tree. Only meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORT_TORCH = [sys.executable, "-c", "import torch"]


def smoke_command(run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "transfer_cli", "train", "trainer=smoke", "trainer.device=cpu",
            f"hydra.run.dir={run_dir}"]


def timed(command: list[str], tree: str | None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one fresh process running `command`."""
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(tree).resolve()), *filter(None, [env.get("PYTHONPATH")])])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr}")
    return elapsed, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def parse_tree(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not Path(path).is_dir():
        raise argparse.ArgumentTypeError(f"--tree NAME=FOLDER with an existing folder, got {text!r}")
    return name, path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tree", type=parse_tree, action="append", default=None, metavar="NAME=FOLDER",
                        help="a source tree to time (repeatable); default: the installed transfer_cli")
    args = parser.parse_args()
    trees = args.tree or [("installed", None)]
    labels = {"import torch": 'python -c "import torch"', **{name: f"train trainer=smoke {name}" for name, _ in trees}}
    wall: dict[str, list[float]] = {name: [] for name in labels}
    cpu: dict[str, list[float]] = {name: [] for name in labels}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats + 1):  # round 0 is the warm-up
            measured = {"import torch": timed(IMPORT_TORCH, None)}
            for name, tree in trees:
                measured[name] = timed(smoke_command(Path(scratch) / f"{name}_{repeat}"), tree)
            if repeat == 0:
                continue
            for name, (seconds, cpu_seconds) in measured.items():
                wall[name].append(seconds)
                cpu[name].append(cpu_seconds)
    torch_s = statistics.median(wall["import torch"])
    print(f"{'command':<32} {'wall s':>7} {'ratio':>6} {'CPU s':>7}  wall of each repeat (s)")
    for name, label in labels.items():
        median = statistics.median(wall[name])
        print(f"{label:<32} {median:7.2f} {median / torch_s:6.2f} {statistics.median(cpu[name]):7.2f}  "
              + " ".join(f"{t:.2f}" for t in wall[name]))
    print(f"ratio smoke/import torch = {statistics.median(wall[trees[-1][0]]) / torch_s:.2f}")


if __name__ == "__main__":
    main()
