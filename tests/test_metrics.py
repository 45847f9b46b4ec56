"""The reported metrics against scikit-learn and torchmetrics on constructed predictions, and the best
epoch picked by trainer.select_by."""
import math

import pytest
import torch
from sklearn import metrics as sk
from torchmetrics.functional.classification import multiclass_calibration_error

from transfer_cli.engine.metrics import CALIBRATION_BINS, SELECTABLE, Tally, check_select_by, selection_key
from transfer_cli.errors import TransferCliError


def tallied(logits: torch.Tensor, labels: torch.Tensor, chunks: int = 1) -> dict:
    counts = Tally(logits.shape[1], torch.device("cpu"), detailed=True)
    for part_logits, part_labels in zip(logits.chunk(chunks), labels.chunk(chunks)):
        counts.add(part_logits, part_labels)
    return counts.metrics()


def predictions(n: int, classes: int, seed: int, skill: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that favour the true class (so accuracies are neither 0 nor 1), with every class present."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.arange(classes), torch.randint(0, classes, (n - classes,), generator=g)])
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), labels] += skill * torch.rand(n, generator=g)
    return logits, labels


def library_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    y, p = labels.numpy(), logits.argmax(1).numpy()
    classes = logits.shape[1]
    scores = logits.softmax(1).numpy()
    return {
        "acc1": sk.accuracy_score(y, p),
        "acc5": sk.top_k_accuracy_score(y, scores, k=min(5, classes), labels=list(range(classes))),
        "mean_class_acc": sk.balanced_accuracy_score(y, p),
        "macro_f1": sk.f1_score(y, p, average="macro", zero_division=0),
        "loss": torch.nn.functional.cross_entropy(logits, labels).item(),
        "ece": multiclass_calibration_error(logits.softmax(1), labels, num_classes=classes,
                                            n_bins=CALIBRATION_BINS, norm="l1").item(),
        "confusion": sk.confusion_matrix(y, p, labels=list(range(classes))).tolist(),
    }


@pytest.mark.parametrize("classes,seed", [(7, 0), (12, 1), (3, 2)])
def test_every_metric_equals_the_librarys(classes, seed):
    logits, labels = predictions(300, classes, seed)
    ours, theirs = tallied(logits, labels, chunks=4), library_metrics(logits, labels)
    assert ours["confusion"] == theirs["confusion"]
    for name in ("acc1", "acc5", "mean_class_acc", "macro_f1", "loss", "ece"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
    assert ours["n"] == 300
    assert ours["acc1"] != ours["mean_class_acc"]  # the classes are of unequal size: the two differ


def test_classes_missing_from_labels_or_predictions_count_as_the_libraries_count_them():
    # class 3 is never the label but is predicted; class 4 occurs nowhere
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 3, 0, 1, 0, 2, 2, 3, 1])
    logits = torch.nn.functional.one_hot(predicted, 5).float() * 3
    ours, theirs = tallied(logits, labels), library_metrics(logits, labels)
    for name in ("acc1", "mean_class_acc", "macro_f1"):
        assert ours[name] == pytest.approx(theirs[name], abs=1e-12), name
    assert ours["mean_class_acc"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 4) / 3)  # recall of the 3 true classes


def test_top5_with_fewer_than_five_classes_is_one():
    logits, labels = predictions(40, 4, 3)
    assert tallied(logits, labels)["acc5"] == 1.0


def test_ece_of_an_overconfident_model_by_hand():
    # every example predicts class 0 with probability 0.8; 6 of 10 are class 0: |0.6 - 0.8| = 0.2
    logits = torch.log(torch.tensor([[0.8, 0.2]])).repeat(10, 1)
    labels = torch.tensor([0] * 6 + [1] * 4)
    assert tallied(logits, labels)["ece"] == pytest.approx(0.2, abs=1e-6)


def test_sums_add_up_across_batches_exactly():
    logits, labels = predictions(257, 9, 4)
    whole, parts = tallied(logits, labels), tallied(logits, labels, chunks=7)
    assert whole["confusion"] == parts["confusion"]
    assert {k: whole[k] for k in ("acc1", "acc5", "mean_class_acc", "macro_f1")} == \
        {k: parts[k] for k in ("acc1", "acc5", "mean_class_acc", "macro_f1")}


def test_an_empty_evaluation_is_nan_not_an_error():
    result = Tally(3, torch.device("cpu"), detailed=True).metrics()
    assert result["n"] == 0 and all(math.isnan(result[name]) for name in SELECTABLE)


def test_per_epoch_metrics_leave_out_calibration_and_the_matrix():
    logits, labels = predictions(50, 5, 5)
    counts = Tally(5, torch.device("cpu"))
    counts.add(logits, labels)
    assert set(counts.metrics()) == {"loss", "acc1", "acc5", "mean_class_acc", "macro_f1", "n"}


def test_selection_prefers_the_metric_then_the_lower_loss():
    early = {"acc1": 0.6, "loss": 1.0, "macro_f1": 0.5}
    later = {"acc1": 0.6, "loss": 0.9, "macro_f1": 0.4}
    assert selection_key(later, "acc1") > selection_key(early, "acc1")  # tie on acc1: lower loss wins
    assert selection_key(early, "macro_f1") > selection_key(later, "macro_f1")
    assert selection_key(later, "loss") > selection_key(early, "loss")
    assert selection_key(early, "acc1") > selection_key({}, "acc1")  # anything beats no epoch yet


def test_an_unknown_select_by_is_one_line_naming_the_choices():
    with pytest.raises(TransferCliError, match="choose one of: acc1, acc5, mean_class_acc, macro_f1, loss"):
        check_select_by("f1")


def test_the_trainer_keeps_the_epoch_the_chosen_metric_prefers(tmp_path):
    from omegaconf import OmegaConf

    from tests.toy import ToyLoader, ToyModel, toy_config
    from transfer_cli.engine.loop import Trainer, TrainState
    from transfer_cli.strategies import build_strategy

    epochs = [{"acc1": 0.5, "loss": 0.7, "macro_f1": 0.5}, {"acc1": 0.7, "loss": 0.9, "macro_f1": 0.6},
              {"acc1": 0.6, "loss": 0.8, "macro_f1": 0.8}]
    best = {}
    for select_by in ("acc1", "macro_f1", "loss"):
        cfg = OmegaConf.create({**toy_config(select_by=select_by), "strategy": {"name": "finetune"}})
        trainer = Trainer(ToyModel(), build_strategy(cfg), ToyLoader(), ToyLoader(), ToyLoader(), cfg,
                          tmp_path / select_by)
        state = TrainState()
        for epoch, val in enumerate(epochs):
            trainer._track_best(state, epoch, val)
        best[select_by] = (state.best_epoch, state.best_val)
    assert {k: epoch for k, (epoch, _) in best.items()} == {"acc1": 1, "macro_f1": 2, "loss": 0}
    assert best["macro_f1"][1] == epochs[2]  # results.json's "val": the chosen epoch's metrics
    assert best["loss"][1]["loss"] == 0.7
