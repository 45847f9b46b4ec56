"""A stand-in with the shape of timm's train.py, for the tests of scripts/bench_gpu.py only.

timm's train.py is on no package index, so a test cannot have it. The bench drives whatever train.py it
is given through its module-level main(), create_dataset, create_loader and train_one_epoch, and passes
the flags timm's --help spells; this file has those names and rejects any other flag, so the tests check
the harness (loading, patching, timing, the report), not timm's speed.
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from timm import create_model


def create_dataset(name, root=None, split="train", is_training=False, **kwargs):
    raise RuntimeError("the bench serves the data itself")


def create_loader(dataset, **kwargs):
    raise RuntimeError("the bench serves the data itself")


def _parse_args():
    parser = argparse.ArgumentParser()
    for flag in ("--data-dir", "--output", "--experiment", "--model", "--device", "--sched", "--opt", "--amp-dtype"):
        parser.add_argument(flag)
    for flag in ("--num-classes", "--img-size", "--batch-size", "--epochs", "--warmup-epochs", "--workers", "--seed",
                 "--checkpoint-hist"):
        parser.add_argument(flag, type=int)
    for flag in ("--lr", "--momentum", "--weight-decay", "--smoothing"):
        parser.add_argument(flag, type=float)
    for flag in ("--amp", "--channels-last"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--torchcompile", nargs="?", const="inductor")
    return parser.parse_args(sys.argv[1:])


def main():
    args = _parse_args()
    model = create_model(args.model, num_classes=args.num_classes).to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.torchcompile:
        model = torch.compile(model, backend=args.torchcompile)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    dataset = create_dataset("", root=args.data_dir, split="train", is_training=True)
    loader = create_loader(dataset, batch_size=args.batch_size, is_training=True)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[args.amp_dtype] if args.amp else None
    for epoch in range(args.epochs):
        train_one_epoch(epoch, model, loader, optimizer, args, dtype)


def train_one_epoch(epoch, model, loader, optimizer, args, dtype):
    model.train()
    for images, labels in loader:
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"loss": loss.item()}
