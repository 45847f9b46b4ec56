"""The metrics transfer papers report, from sums over the evaluated examples.

An evaluation keeps a `Tally`: the summed loss, the confusion matrix, the top-5 hits and (for the
test split) calibration bins. Every metric follows from these sums, and sums add up across batches
and across data-parallel processes, so a sharded evaluation gives the whole split's numbers.

    acc1            top-1 accuracy
    acc5            top-5 accuracy (top-k with k = the number of classes when there are fewer than 5)
    mean_class_acc  mean per-class accuracy: the recall of each class present in the labels, averaged
                    (what Aircraft, Pets, Flowers and Caltech results are reported in; scikit-learn's
                    balanced_accuracy_score)
    macro_f1        F1 of each class that occurs in the labels or the predictions, averaged
    ece             expected calibration error: 15 equal-width bins of the top-1 probability, the
                    bins' |accuracy - confidence| weighted by their share of the examples (Guo et al.
                    2017; torchmetrics' multiclass_calibration_error, bins included)
    confusion       rows: true class, columns: predicted class

The formulas are the libraries' own definitions, written on the tallies instead of calling
torchmetrics or scikit-learn: importing either costs seconds of every run's start-up (they pull in
scipy, and torchmetrics transformers and matplotlib too), and their functions want every prediction,
which a data-parallel evaluation does not hold in one process. tests/test_metrics.py holds every
metric equal to scikit-learn's or torchmetrics' on constructed predictions.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from transfer_cli.errors import TransferCliError

#: the validation metrics `trainer.select_by` may name (all but loss: higher is better)
SELECTABLE = ("acc1", "acc5", "mean_class_acc", "macro_f1", "loss")
CALIBRATION_BINS = 15
TOP_K = 5


class Tally:
    """Sums over the examples seen so far; `detailed` adds the calibration bins (the test split's ECE)."""

    def __init__(self, num_classes: int, device: torch.device, detailed: bool = False):
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.top_k = torch.zeros((), dtype=torch.long, device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        self.detailed = detailed
        # per bin: examples, summed top-1 probability, correct top-1 predictions (a last bin holds probability 1.0)
        self.bins = torch.zeros(3, CALIBRATION_BINS + 1, dtype=torch.float64, device=device) if detailed else None
        self._edges = torch.linspace(0, 1, CALIBRATION_BINS + 1, device=device)

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        self.loss += F.cross_entropy(logits, labels, reduction="sum").double()
        predicted = logits.argmax(dim=1)
        classes = self.num_classes
        self.confusion += torch.bincount(labels * classes + predicted, minlength=classes * classes).view(classes, classes)
        top = logits.topk(min(TOP_K, classes), dim=1).indices
        self.top_k += (top == labels[:, None]).any(dim=1).sum()
        if self.bins is not None:
            confidence = logits.softmax(dim=1).amax(dim=1)
            where = torch.bucketize(confidence, self._edges, right=True) - 1
            for row, values in enumerate((torch.ones_like(confidence), confidence, (predicted == labels).float())):
                self.bins[row].index_add_(0, where, values.double())

    def sums(self) -> list[torch.Tensor]:
        """The tensors that add up across processes (summed in place by `distributed.merge_evaluation`)."""
        return [t for t in (self.loss, self.top_k, self.confusion, self.bins) if t is not None]

    def metrics(self) -> dict:
        """Every metric as a float (and `n`); with `detailed`, also `ece` and the confusion matrix."""
        confusion = self.confusion.double()
        n = int(self.confusion.sum())
        if n == 0:
            empty = {name: math.nan for name in SELECTABLE}
            return {**empty, **({"ece": math.nan, "confusion": []} if self.detailed else {}), "n": 0}
        hits = confusion.diagonal()
        support, predicted = confusion.sum(dim=1), confusion.sum(dim=0)
        present = support > 0
        occurring = (support + predicted) > 0
        result = {
            "loss": float(self.loss) / n,
            "acc1": float(hits.sum()) / n,
            "acc5": float(self.top_k) / n,
            "mean_class_acc": float((hits[present] / support[present]).mean()),
            "macro_f1": float((2 * hits[occurring] / (support + predicted)[occurring]).mean()),
            "n": n,
        }
        if self.detailed:
            _, confidence, correct = self.bins
            result["ece"] = float((correct - confidence).abs().sum()) / n
            result["confusion"] = self.confusion.tolist()
        return result


def check_select_by(name: str) -> str:
    if name not in SELECTABLE:
        raise TransferCliError(f"trainer.select_by={name!r}; choose one of: {', '.join(SELECTABLE)}")
    return name


def selection_key(metrics: Optional[Mapping[str, float]], select_by: str) -> tuple[float, float]:
    """What the best epoch maximises: the metric, ties broken by the lower loss; for `loss`, the lower
    loss, ties broken by the higher acc1. No metrics yet (before the first epoch) sorts below all."""
    if not metrics:
        return (-math.inf, -math.inf)
    if select_by == "loss":
        return (-metrics["loss"], metrics["acc1"])
    return (metrics[select_by], -metrics["loss"])


def scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """The numbers of an evaluation, without its count and matrix: what metrics.jsonl records per epoch."""
    return {k: v for k, v in metrics.items() if k not in ("n", "confusion")}
