"""transfer-cli's Trainer against timm's own train.py: training images/s, same device, model, batch and size.

    python scripts/bench_gpu.py --timm-train path/to/train.py     # CUDA: resnet50, 224 px, batch 128, bf16, compiled
    python scripts/bench_gpu.py --timm-train path/to/train.py --device cpu --model test_resnet \
        --image-size 32 --batch-size 8 --steps 3                  # CPU smoke run

Where train.py comes from: timm's training script is in neither the timm wheel nor the timm sdist on
PyPI (the 1.0.31 sdist holds tests that import it, not the file), so it cannot be fetched with pip. It is
passed in: train.py of the pytorch-image-models repository at the tag of the installed timm. Without it
the script stops with one line saying so, before any work.

How each side runs, in this one process, trials alternating (who goes first swaps every trial); each
trial is a fresh run of two epochs of --steps batches: the first absorbs compilation and cuDNN
autotuning, the second is timed, and the medians of --repeats trials are compared.

- timm: train.py is imported from its file and its own main() runs with the command line one would
  type (--model, --batch-size, --img-size, --amp --amp-dtype bfloat16, --channels-last, --torchcompile,
  --opt momentum, ...), so model creation, optimizer, schedule, AMP and train_one_epoch are timm's code.
  The timed span is one call of its train_one_epoch, with a device sync at both ends. Its logged
  samples/s is not parsed: the log format and the log interval's sampling differ between versions.
- transfer-cli: the real Trainer (backbone=timm, strategy=finetune, optim=sgd, trainer.precision,
  trainer.channels_last=true, trainer.compile) composed from the project's configs; the timed span is
  the epoch time it records itself (metrics.jsonl's epoch_time_s).

Data loading is measured on neither side: both read the same normalised random images, already on the
device. train.py's create_dataset / create_loader are replaced by ones that serve those batches, which
is what timm's CUDA prefetching loader hands train_one_epoch; the Trainer gets the project's
TensorLoader over the same tensors. Both compute plain cross-entropy (--smoothing 0 for timm) and step
SGD with momentum 0.9 and no Nesterov at the project's default rate and weight decay.

train.py sets global backend flags (cudnn.benchmark, TF32 matmuls); they are put back to their values
at the start before every transfer-cli trial, so each side runs with only its own settings (the Trainer
turns cudnn.benchmark on by itself on CUDA: trainer.cudnn_benchmark); the flags train.py changed are
printed. The last line is `ratio transfer-cli/timm = <number>` (above 1: transfer-cli faster).
"""
from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import timm
import torch

from transfer_cli.backbones import build_backbone
from transfer_cli.overrides import compose_config
from transfer_cli.data.common import first_line
from transfer_cli.data.tensor_batches import TensorLoader
from transfer_cli.engine.device import resolve_device
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy

NUM_CLASSES = 10
AMP_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}
#: what the bench calls (main), replaces (the data) or times (train_one_epoch) in train.py
TRAIN_PY_NAMES = ("main", "create_dataset", "create_loader", "train_one_epoch")


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timm-train", type=Path, help="timm's train.py, at the repository tag of the installed timm")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="resnet50", help="a timm model name")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="training steps per epoch")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="auto: on for CUDA")
    parser.add_argument("--repeats", type=int, default=3, help="timed trials of each side (median taken)")
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats) < 1 or args.batch_size < 2 or args.image_size < 1:
        parser.error("--steps and --repeats take at least 1, --batch-size at least 2 (BatchNorm), --image-size 1")
    return args


def load_train_py(path: Optional[Path]):
    """timm's train.py as a module, checked for the functions the bench drives."""
    where = f"the pytorch-image-models repository at tag v{timm.__version__}"
    if path is None:
        raise TransferCliError(f"pass timm's train.py with --timm-train PATH: it is not in the timm wheel nor in "
                               f"the timm sdist on PyPI; take train.py from {where}")
    if not path.is_file():
        raise TransferCliError(f"--timm-train {path}: no such file; take train.py from {where}")
    spec = importlib.util.spec_from_file_location("timm_train_py", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # anything its imports raise: most likely a train.py of another timm version
        raise TransferCliError(f"cannot import {path} ({first_line(err)}); take train.py from {where}") from None
    missing = [name for name in TRAIN_PY_NAMES if not callable(getattr(module, name, None))]
    if missing:
        raise TransferCliError(f"{path} defines no {', '.join(missing)}, which the bench drives; "
                               f"take train.py from {where}")
    return module


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_flags() -> dict:
    return {"cudnn.benchmark": torch.backends.cudnn.benchmark, "cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


def set_backend_flags(flags: dict) -> None:
    torch.backends.cudnn.benchmark = flags["cudnn.benchmark"]
    torch.backends.cudnn.allow_tf32 = flags["cudnn.allow_tf32"]
    torch.set_float32_matmul_precision(flags["float32_matmul_precision"])


def device_images(args: argparse.Namespace, prep: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """steps x batch random images, normalised with the model's mean and std, and labels, on the device."""
    g = torch.Generator().manual_seed(0)
    n, size = args.steps * args.batch_size, args.image_size
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)
    mean = torch.tensor(prep["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(prep["std"], device=device).view(1, -1, 1, 1)
    images = torch.empty((n, 3, size, size), device=device)
    for chunk in images.split(1024):  # a chunk at a time: the uint8 images stay small on the host
        raw = torch.randint(0, 256, chunk.shape, generator=g, dtype=torch.uint8).to(device)
        torch.sub(raw.float() / 255, mean, out=chunk).div_(std)
    return images, labels


class DeviceBatches:
    """(input, target) pairs already on the device, as timm's prefetching loader yields them; it stands in
    for both train.py's dataset and its loader (create_loader hands the dataset back)."""

    sampler = None  # what train.py may look at on a loader
    mixup_enabled = False

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int):
        self.batch_size = batch_size
        self.dataset = self
        self.batches = list(zip(images.split(batch_size), labels.split(batch_size)))

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class TimmTrainPy:
    """Runs train.py's main() on the device batches and times each call of its train_one_epoch."""

    def __init__(self, module, arguments: list[str], train: DeviceBatches, held_out: DeviceBatches,
                 device: torch.device):
        self.module, self.arguments = module, arguments
        self.epoch_times: list[float] = []
        train_one_epoch = module.train_one_epoch

        def timed_epoch(*args, **kwargs):
            synchronize(device)
            started = time.perf_counter()
            result = train_one_epoch(*args, **kwargs)
            synchronize(device)
            self.epoch_times.append(time.perf_counter() - started)
            return result

        module.train_one_epoch = timed_epoch
        module.create_dataset = lambda *args, is_training=False, **kwargs: train if is_training else held_out
        module.create_loader = lambda dataset, *args, **kwargs: dataset

    def epoch_time(self) -> float:
        """Seconds of the second training epoch of one run of train.py."""
        self.epoch_times = []
        argv, handlers = sys.argv, list(logging.root.handlers)
        with tempfile.TemporaryDirectory() as out:
            sys.argv = ["train.py", *self.arguments, "--data-dir", out, "--output", out, "--experiment", "bench"]
            try:
                self.module.main()
            except SystemExit as err:  # argparse: a flag this train.py does not know
                raise TransferCliError(f"timm's train.py stopped (exit {err.code}) on the arguments "
                                       f"{' '.join(sys.argv[1:])}; is it from timm {timm.__version__}?") from None
            finally:
                sys.argv = argv
                logging.root.handlers[:] = handlers  # each main() adds its own log handler
        if len(self.epoch_times) != 2:
            raise TransferCliError(f"timm's train.py ran {len(self.epoch_times)} training epochs, not the 2 asked for")
        return self.epoch_times[1]


def timm_arguments(args: argparse.Namespace, cfg, compiled: bool) -> list[str]:
    """train.py's command line for the same run as the Trainer's (flags as its --help spells them)."""
    o = cfg.optim
    arguments = [
        "--model", args.model, "--num-classes", str(NUM_CLASSES), "--img-size", str(args.image_size),
        "--batch-size", str(args.batch_size), "--epochs", "2", "--warmup-epochs", "0", "--sched", "cosine",
        "--opt", "momentum", "--lr", str(o.lr), "--momentum", str(o.momentum), "--weight-decay", str(o.weight_decay),
        "--smoothing", "0", "--channels-last", "--device", args.device, "--workers", "0", "--seed", "0",
        "--checkpoint-hist", "1",
    ]
    if args.precision in AMP_DTYPES:
        arguments += ["--amp", "--amp-dtype", AMP_DTYPES[args.precision]]
    if compiled:
        arguments.append("--torchcompile")
    return arguments


def trainer_epoch_time(cfg, template, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds of the second training epoch of the real Trainer on a fresh copy of the model."""
    batch = int(cfg.trainer.batch_size)
    model = copy.deepcopy(template)
    train = TensorLoader(labels, lambda index: {"pixel_values": images[index]}, batch, shuffle=True, seed=0)
    held_out = [TensorLoader(labels[:batch], lambda index: {"pixel_values": images[:batch][index]}, batch,
                             shuffle=False, seed=0) for _ in range(2)]
    with tempfile.TemporaryDirectory() as run_dir:
        Trainer(model, build_strategy(cfg), train, *held_out, cfg, Path(run_dir)).fit()
        return read_jsonl(Path(run_dir) / "metrics.jsonl")[1]["epoch_time_s"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def run(args: argparse.Namespace) -> None:
    start_flags = backend_flags()  # before train.py is imported: it may set them at import
    train_py = load_train_py(args.timm_train)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise TransferCliError(f"--device {args.device} but this machine has no CUDA device; "
                               "run on a GPU, or pass --device cpu for a smoke run")
    device = resolve_device(args.device)
    compiled = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    cfg = compose_config([
        "backbone=timm", f"backbone.name={args.model}", "backbone.pretrained=false",
        f"backbone.image_size={args.image_size}", "strategy=finetune", "optim=sgd", "sched=cosine",
        "trainer.max_epochs=2", f"trainer.batch_size={args.batch_size}", f"trainer.eval_batch_size={args.batch_size}",
        f"trainer.device={args.device}", f"trainer.precision={args.precision}", "trainer.channels_last=true",
        f"trainer.compile={str(compiled).lower()}", "trainer.progress=false",
    ])
    torch.manual_seed(0)
    template = build_backbone(cfg.backbone, NUM_CLASSES)
    images, labels = device_images(args, template.preprocessing, device)
    batch = args.batch_size
    timm_side = TimmTrainPy(train_py, timm_arguments(args, cfg, compiled), DeviceBatches(images, labels, batch),
                            DeviceBatches(images[:batch], labels[:batch], batch), device)

    def ours() -> float:
        set_backend_flags(start_flags)
        return trainer_epoch_time(cfg, template, images, labels)

    runs: dict[str, Callable[[], float]] = {"timm": timm_side.epoch_time, "transfer-cli": ours}
    times: dict[str, list[float]] = {name: [] for name in runs}
    timm_flags = start_flags
    n = args.steps * batch
    for trial in range(args.repeats):
        for name in (list(runs) if trial % 2 == 0 else list(runs)[::-1]):
            torch._dynamo.reset()  # every run compiles afresh, as a new process would
            times[name].append(runs[name]())
            if name == "timm":
                timm_flags = backend_flags()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"trial {trial} {name}: {n / times[name][-1]:.1f} images/s", file=sys.stderr, flush=True)

    print(f"device {device_name(device)}, torch {torch.__version__}, timm {timm.__version__}")
    print(f"model {args.model}, batch {batch}, image {args.image_size} px, precision {args.precision}, "
          f"channels_last on, compile {'on' if compiled else 'off'}, {args.steps} steps per timed epoch, "
          f"median of {args.repeats} trials")
    print(f"timm's train.py: {args.timm_train}")
    changed = {k: v for k, v in timm_flags.items() if v != start_flags[k]}
    if changed:
        print("train.py sets " + ", ".join(f"{k}={v}" for k, v in changed.items())
              + "; put back to " + ", ".join(f"{k}={start_flags[k]}" for k in changed) + " for transfer-cli")
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in runs:
        trials = ", ".join(f"{n / t:.1f}" for t in times[name])
        print(f"{name:>14}: {n / median[name]:10.1f} images/s  (trials: {trials})")
    print(f"ratio transfer-cli/timm = {median['timm'] / median['transfer-cli']:.3f}")


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        run(args)
    except TransferCliError as err:
        print(f"bench_gpu: error: {err}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
