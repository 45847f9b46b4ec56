"""transfer-cli's training loop against a minimal hand-written PyTorch loop, in one process.

    python scripts/bench_overhead.py                 # CPU: timm resnet18 at 32 px, batch 32
    python scripts/bench_overhead.py --device cuda --model resnet50 --image-size 224 --batch-size 64

Same model (one initial state), data (in-memory images), batch size, optimizer (SGD with the
project's default settings) and number of steps. The engine is the real Trainer fed by the
project's own loader (`make_loader` over an in-memory split); its time is the training epoch as
the Trainer reports it (`epoch_time_s`: loader, schedule, forward, backward, step, metrics),
without the once-per-epoch validation and checkpoint. The hand loop slices pre-normalised tensors.
Trials alternate engine / hand after a warm-up of each, and the medians are compared.

It also times the engine with the bottom half of the layer groups frozen (feature cache off):
frozen layers need no backward pass, so those steps must be cheaper than full fine-tuning.
The last line is `ratio engine/hand = <number>`.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from transfer_cli.backbones import build_backbone
from transfer_cli.overrides import compose_config
from transfer_cli.data import ImageArraySplit, make_loader
from transfer_cli.engine.device import autocast, resolve_precision
from transfer_cli.engine.loop import Trainer
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy

NUM_CLASSES = 10


def make_config(args: argparse.Namespace, strategy: list[str]):
    return compose_config([
        "backbone=timm", f"backbone.name={args.model}", "backbone.pretrained=false",
        f"backbone.image_size={args.image_size}", *strategy, "optim=sgd", "sched=cosine",
        "trainer.max_epochs=1", f"trainer.batch_size={args.batch_size}", f"trainer.eval_batch_size={args.batch_size}",
        f"trainer.device={args.device}", "trainer.progress=false",
    ])


def engine_epoch(cfg, template, split: ImageArraySplit, held_out: ImageArraySplit) -> float:
    """Seconds of one training epoch of the real Trainer on a fresh copy of the model."""
    model = copy.deepcopy(template)
    batch = int(cfg.trainer.batch_size)
    loaders = [make_loader(split, model, batch, train=True, seed=0),
               make_loader(held_out, model, batch, train=False, seed=0),
               make_loader(held_out, model, batch, train=False, seed=0)]
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(model, build_strategy(cfg), *loaders, cfg, Path(run_dir)).fit()
        return read_jsonl(Path(run_dir) / "metrics.jsonl")[0]["epoch_time_s"]


def hand_epoch(cfg, template, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    """Seconds of the same epoch in the loop one would write by hand."""
    model = copy.deepcopy(template).to(device).train()
    precision = resolve_precision(str(cfg.trainer.precision), device)
    if device.type == "cuda":  # what the engine does there by default
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    o = cfg.optim
    optimizer = torch.optim.SGD(model.parameters(), lr=float(o.lr), momentum=float(o.momentum),
                                nesterov=bool(o.nesterov), weight_decay=float(o.weight_decay))
    batch = int(cfg.trainer.batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0)).to(device)
    for start in range(0, len(labels), batch):
        index = order[start:start + batch]
        with autocast(device, precision):
            loss = F.cross_entropy(model({"pixel_values": images[index]}).float(), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()  # wait for the device
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="training steps per timed epoch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each kind (median taken)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = make_config(args, ["strategy=finetune"])
    torch.manual_seed(0)
    template = build_backbone(cfg.backbone, NUM_CLASSES)
    body_groups = len(template.body_group_names())
    frozen_cfg = make_config(args, ["strategy=freeze", f"strategy.groups={body_groups // 2}",
                                    "strategy.cache_features=false"])

    g = torch.Generator().manual_seed(0)
    n = args.steps * args.batch_size
    size = (3, args.image_size, args.image_size)
    split = ImageArraySplit(torch.randint(0, 256, (n, *size), generator=g, dtype=torch.uint8),
                            torch.randint(0, NUM_CLASSES, (n,), generator=g))
    held_out = split.select(torch.arange(args.batch_size))
    device = torch.device(args.device)
    # the hand loop's data: normalised once with the backbone's mean and std, already on the device
    prep = template.preprocessing
    mean = torch.tensor(prep["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(prep["std"]).view(1, -1, 1, 1)
    images = ((split.images.float() / 255 - mean) / std).to(device)
    labels = split.labels.to(device)

    runs = {
        "engine": lambda: engine_epoch(cfg, template, split, held_out),
        "hand": lambda: hand_epoch(cfg, template, images, labels, device),
        "frozen": lambda: engine_epoch(frozen_cfg, template, split, held_out),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run()  # warm-up
    for trial in range(args.repeats):
        for name, run in runs.items():
            times[name].append(run())
            print(f"trial {trial} {name}: {n / times[name][-1]:.1f} samples/s", file=sys.stderr, flush=True)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.steps} steps per epoch, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.repeats}")
    for name, label in (("hand", "hand-written loop"), ("engine", "transfer-cli engine"),
                        ("frozen", f"engine, bottom {body_groups // 2} of {body_groups} groups frozen")):
        spread = ", ".join(f"{n / t:.0f}" for t in times[name])
        print(f"{label:>40}: {n / median[name]:8.1f} samples/s  (trials: {spread})")
    best = {name: min(values) for name, values in times.items()}
    print(f"best trials (least disturbed by other load): engine/hand = {best['hand'] / best['engine']:.3f}, "
          f"finetune/frozen_bottom_half = {best['engine'] / best['frozen']:.3f}")
    print(f"ratio finetune/frozen_bottom_half = {median['engine'] / median['frozen']:.3f}")
    print(f"ratio engine/hand = {median['hand'] / median['engine']:.3f}")


if __name__ == "__main__":
    main()
