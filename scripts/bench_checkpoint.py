"""The cost of mid-epoch checkpoints: training step time with and without them, as a ratio.

    python scripts/bench_checkpoint.py                                  # quickstart, digits, default setting
    python scripts/bench_checkpoint.py --every 500 backbone=timm backbone.name=resnet50 trainer.device=cuda

Three runs of `transfer-cli train` in this process, after a warm-up run that pays the one-time
imports: without mid-epoch checkpoints (`trainer.checkpoint_every=null`), with a checkpoint after every
step (the worst case: the difference over the steps is the cost of one write of last.pt, model,
optimizer and random state), and at the setting asked (`--every`, default the config's 10min). The
ratio at the setting is measured when the run writes at least one mid-epoch checkpoint; a wall-time
setting longer than the run cannot be, so its ratio is computed from the measured write and step
times: 1 + write / (interval). The last line is `ratio with/without at checkpoint_every=<setting> = <number>`.
Timings mean something only on an idle machine.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from transfer_cli.engine.mid_epoch import parse_every
from transfer_cli.engine.run import run_training
from transfer_cli.overrides import compose_config


def train_seconds(overrides: list[str], every: str) -> tuple[float, int]:
    """The run's training time (no start-up, validation or test) and its optimizer steps."""
    cfg = compose_config([*overrides, f"trainer.checkpoint_every={every}"])
    with tempfile.TemporaryDirectory() as run_dir:
        results = run_training(cfg, Path(run_dir))
    return results["time"]["train_s"], int(results["steps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", default="10min", help="the trainer.checkpoint_every setting to price")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="extra transfer-cli overrides")
    args = parser.parse_args()
    overrides = ["data.samples_per_class=null", "trainer.device=cpu", "trainer.progress=false",
                 f"trainer.max_epochs={args.epochs}", *args.overrides]
    train_seconds([*overrides, "trainer.max_epochs=1"], "null")  # warm-up

    without_s, steps = train_seconds(overrides, "null")
    every_step_s, _ = train_seconds(overrides, "1")
    at_setting_s, _ = train_seconds(overrides, args.every)
    per_epoch = steps // args.epochs  # the last step of an epoch writes the epoch's checkpoint, not a mid-epoch one
    step_s = without_s / steps
    write_s = max(every_step_s - without_s, 0.0) / max((per_epoch - 1) * args.epochs, 1)
    every_steps, every_seconds = parse_every(args.every)
    writes = ((per_epoch - 1) // every_steps * args.epochs if every_steps
              else int(without_s // every_seconds) if every_seconds else 0)
    print(f"config: {' '.join(overrides)}")
    print(f"{steps} steps: {step_s * 1000:.2f} ms a step without mid-epoch checkpoints; one last.pt write "
          f"{write_s * 1000:.2f} ms (from a checkpoint after every step: {every_step_s:.2f} s vs {without_s:.2f} s)")
    if writes:
        ratio, how = at_setting_s / without_s, f"measured, {writes} mid-epoch write(s)"
    else:
        interval_s = every_seconds if every_seconds else float("inf")
        ratio, how = 1 + write_s / interval_s, f"computed: the run is shorter than {args.every}"
    print(f"ratio with/without at checkpoint_every={args.every} = {ratio:.4f} ({how})")


if __name__ == "__main__":
    main()
