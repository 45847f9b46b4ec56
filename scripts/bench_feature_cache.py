"""A linear probe with and without the frozen-feature cache: wall time, test accuracy, and their ratio.

    python scripts/bench_feature_cache.py                      # digits, every training image, 64 px, 30 epochs
    python scripts/bench_feature_cache.py --device cuda experiment=fmnist_fewshot data.samples_per_class=500

Both runs are `transfer-cli train strategy=freeze` with the same config except
`strategy.cache_features`, timed end to end (data, model, 30 epochs with validation, test) in this
process after a warm-up run that pays the one-time imports. The last line is
`ratio uncached/cached = <number>`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from transfer_cli.overrides import compose_config
from transfer_cli.engine.run import run_training


def timed_run(overrides: list[str], cache: str) -> tuple[float, dict]:
    cfg = compose_config([*overrides, f"strategy.cache_features={cache}"])
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        results = run_training(cfg, Path(run_dir))
        return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("overrides", nargs="*", help="extra transfer-cli overrides")
    args = parser.parse_args()
    # digits with every training image (about 100 per class), resized to 64 px: the body's forward is most
    # of the work, as with a real backbone (at the quickstart's 32 px, building the data and testing weigh more)
    overrides = ["strategy=freeze", "data.samples_per_class=null", "backbone.image_size=64",
                 f"trainer.max_epochs={args.epochs}",
                 f"trainer.device={args.device}", "trainer.progress=false", *args.overrides]
    timed_run([*overrides, "trainer.max_epochs=1"], "false")  # warm-up: imports, first-call allocations

    uncached_s, uncached = timed_run(overrides, "false")
    cached_s, cached = timed_run(overrides, "true")
    print(f"config: {' '.join(overrides)}")
    for name, seconds, results in (("uncached", uncached_s, uncached), ("cached", cached_s, cached)):
        print(f"{name:>8}: {seconds:7.2f} s  test acc1 {results['test']['acc1']:.6f}  "
              f"test loss {results['test']['loss']:.6f}  best epoch {results['best_epoch']}")
    print(f"test acc1 difference = {abs(cached['test']['acc1'] - uncached['test']['acc1']):.2e}")
    print(f"ratio uncached/cached = {uncached_s / cached_s:.2f}")


if __name__ == "__main__":
    main()
