"""The linear probe by L-BFGS (Kornblith et al. 2019): the optimum of the regularised logistic loss, its L2
strength chosen on validation, a sane loss where SGD's explodes, one epoch in the loop."""
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.overrides import compose_config
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.schedules.probe import fit_logistic, l2_grid, select_probe
from tests.test_feature_cache import loaders
from tests.toy import ToyModel, toy_config


def test_lbfgs_reaches_the_optimum_of_the_regularised_logistic_loss():
    """scikit-learn's multinomial LogisticRegression minimises ½‖W‖² + C·Σ CE: the same problem at l2 = 1 / (C n)."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (60,), generator=g)
    l2 = 0.05
    weight, bias, _ = fit_logistic(x, y, l2, (torch.zeros(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)),
                                   max_iter=500)
    reference = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    assert weight.numpy() == pytest.approx(reference.coef_, abs=1e-4)
    assert bias.numpy() - bias.numpy().mean() == pytest.approx(reference.intercept_ - reference.intercept_.mean(),
                                                               abs=1e-4)


def test_the_l2_strength_is_chosen_on_validation():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 20, generator=g) * 0.5
    labels = torch.arange(40) % 2
    train = (centres[labels] + torch.randn(40, 20, generator=g), labels)
    val = (centres[labels] + torch.randn(40, 20, generator=g), labels)
    grid = l2_grid(1e-4, 1e2, 7)
    assert grid[0] == pytest.approx(1e2) and grid[-1] == pytest.approx(1e-4)
    best, solved = select_probe(train, val, 2, grid, max_iter=200)
    assert [p.l2 for p in solved] == grid
    assert (best.val_acc1, -best.val_loss) == max((p.val_acc1, -p.val_loss) for p in solved)
    assert solved[0].train_acc1 <= solved[-1].train_acc1  # weaker regularisation fits the training set closer
    with pytest.raises(TransferCliError, match="validation split, which is empty"):
        select_probe(train, (val[0][:0], val[1][:0]), 2, grid, max_iter=10)


class LoudModel(ToyModel):
    """The toy model with features of norm about 60 (2,000 times its own), the magnitude of a real network's
    pooled features."""

    def features(self, batch):
        return super().features(batch) * 2000


def probe_run(tmp_path, resume=False, regularizers=(), **strategy):
    torch.manual_seed(0)
    cfg = toy_config(max_epochs=10, resume=resume)
    shipped = compose_config(["strategy=freeze", *([f"regularizers=[{','.join(regularizers)}]"] if regularizers else [])])
    cfg.strategy = OmegaConf.merge(shipped.strategy, strategy)  # the shipped defaults
    cfg.regularizers = shipped.get("regularizers") or {}
    model = LoudModel()
    result = Trainer(model, build_strategy(cfg), *loaders(model), cfg, tmp_path).fit()
    return model, result, read_jsonl(tmp_path / "metrics.jsonl")


def test_the_default_probe_is_lbfgs_in_one_epoch_with_a_sane_loss(tmp_path):
    chance = math.log(3)
    model, result, records = probe_run(tmp_path / "default")
    assert len(records) == 1 and records[0]["trainable_groups"] == ["head"] and "probe_l2" in records[0]
    assert records[0]["val_loss"] < chance and result.test["loss"] < chance
    _, sgd, sgd_records = probe_run(tmp_path / "sgd", solver="sgd")  # the old default: SGD at lr 0.05, momentum
    assert len(sgd_records) == 10 and max(r["val_loss"] for r in sgd_records) > 3 * chance
    assert result.test["acc1"] >= sgd.test["acc1"]


def test_the_default_probe_with_a_regularizer_term_trains_by_sgd_with_it(tmp_path):
    """auto never drops a held term: L-BFGS solves the probe's own objective, so the loop's SGD trains."""
    _, _, records = probe_run(tmp_path, regularizers=["l2sp"])
    assert len(records) == 10 and not any("probe_l2" in r for r in records)
    assert all(r["train_penalty/l2sp"] > 0 for r in records)


def test_a_finished_probe_resumes_to_its_test_without_training_more(tmp_path):
    _, first, _ = probe_run(tmp_path)
    _, again, records = probe_run(tmp_path, resume=True)
    assert len(records) == 1 and again.test == first.test


@pytest.mark.parametrize("override, message", [
    (["strategy.solver=lbfgs", "strategy.groups=1"], "strategy.groups=1 leaves part of the body training"),
    (["strategy.solver=lbfgs", "strategy.cache_features=false"], "strategy.cache_features=false"),
    (["strategy.solver=lbfgs", "data.augment=true"], "needs the frozen body's features computed once, but data.augment"),
    (["strategy.solver=adam"], "strategy.solver='adam'"),
    (["strategy.solver=lbfgs", "regularizers=[bss]"], "cannot add regularizer bss"),
])
def test_lbfgs_says_in_one_line_when_it_cannot_fit(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit):
        main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", "strategy=freeze", *override])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_probe_records_its_search(tmp_path):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", "strategy=freeze"])
    probe = json.loads((tmp_path / "results.json").read_text())["probe"]
    assert probe["solver"] == "lbfgs" and len(probe["searched"]["l2"]) == 45 and probe["l2"] in probe["searched"]["l2"]
    assert probe["val_acc1"] == max(probe["searched"]["val_acc1"])
