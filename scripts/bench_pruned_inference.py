"""Inference speed of a TransTailor run's pruned model against the unpruned backbone it came from.

    python scripts/bench_pruned_inference.py run=runs/<date>/<time>_fmnist_fewshot_transtailor

The pruned model is rebuilt exactly as `transfer-cli eval` rebuilds it (structure from the run's
strategy state, weights from best.pt); the unpruned one is the same backbone as the run's config
builds it before pruning. Both run in eval mode without gradients on CPU, on batches of 64 images at
the run's input size; each is timed for --seconds after a warm-up, alternating, and the best of
--repeats is kept. The last line is `ratio unpruned/pruned = <x>`: the unpruned model's time per image
over the pruned model's (images/s pruned ÷ images/s unpruned), the speed-up pruning bought.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from transfer_cli.run_folder import run_config
from transfer_cli.engine.evaluate_run import restore_run
from transfer_cli.engine.run import assemble
from transfer_cli.strategies.pruning.cnn import count_flops, count_params


def images_per_s(model: torch.nn.Module, images: torch.Tensor, seconds: float) -> float:
    with torch.no_grad():
        for _ in range(3):
            model({"pixel_values": images})
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model({"pixel_values": images})
            done += images.shape[0]
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run=<a transtailor run folder>")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    run_dir = Path(args.run.removeprefix("run="))
    cfg = run_config(run_dir, {"trainer.device": "cpu"})
    pruned, _, _ = restore_run(cfg, run_dir)
    unpruned = assemble(cfg).model
    models = {"unpruned": unpruned.eval(), "pruned": pruned.model.eval()}
    images = torch.randn(args.batch_size, *unpruned.preprocessing["input_size"])
    best = {name: 0.0 for name in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            best[name] = max(best[name], images_per_s(model, images, args.seconds))
    for name, model in models.items():
        print(f"{name}: {count_params(model)} params, {count_flops(model)} FLOPs/image, "
              f"{best[name]:.0f} images/s at batch {args.batch_size} ({torch.get_num_threads()} threads)")
    print(f"ratio unpruned/pruned = {best['pruned'] / best['unpruned']:.2f}")


if __name__ == "__main__":
    main()
