"""What Co-Tuning and LwF share: the source model's own classifier on the model's features, and one
pass of the frozen pretrained model over the training split before training starts."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.engine.device import to_device
from transfer_cli.errors import TransferCliError

#: the methods that read the source task's outputs, named in the refusal
NEEDING = "co_tuning and lwf"


def source_head(model: TransferModel, term: str) -> nn.Module:
    """A copy of the source model's classifier (e.g. its 1000 ImageNet classes), or one clear line when the
    backbone kept none. Built under a forked RNG: a new layer's init must not move the run's random stream."""
    with forked_rng(model):
        head = model.source_head()
    if head is None:
        raise TransferCliError(
            f"{term} needs the source model's own classifier ({NEEDING} do), and this backbone has none "
            "(random init, or weights saved without their classifier); use pretrained weights that hold it: "
            "timm's hub weights, a file exported by transfer-cli, a Hugging Face *ForSequenceClassification folder")
    return head


@contextmanager
def forked_rng(model: nn.Module) -> Iterator[None]:
    """Run the block without changing the random state of the model's device."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield


@torch.no_grad()
def over_training_split(model: TransferModel, loader: Any, device: torch.device,
                        per_batch: Callable[[Batch], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_batch` of every training example, in stored order, with the model in eval mode and the RNG
    untouched; returns the outputs and the labels, row i for example i."""
    was_training = model.training
    model.eval()
    outputs, labels = [], []
    try:
        with forked_rng(model), loader.stored_order():
            loader.set_epoch(0)
            for batch in loader:
                batch = to_device(batch, device)
                outputs.append(per_batch(batch).float())
                labels.append(batch["labels"])
    finally:
        model.train(was_training)
    return torch.cat(outputs), torch.cat(labels)
