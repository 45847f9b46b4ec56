"""Where a run's time goes (results.json `time`, the printed line), trainer.val_every, and validation and
test capped separately."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.engine.timing import val_every, validates
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from tests.toy import ToyLoader, ToyModel, toy_config


class CountingLoader(ToyLoader):
    """A ToyLoader that remembers how many batches each pass over it served."""

    def __init__(self, **kwargs):
        super().__init__(shuffle=False, **kwargs)
        self.passes: list[int] = []

    def __iter__(self):
        self.passes.append(0)
        for batch in super().__iter__():
            self.passes[-1] += 1
            yield batch


def fit(run_dir, strategy=None, **trainer):
    torch.manual_seed(0)
    cfg = toy_config(**trainer)
    cfg.strategy = OmegaConf.create(strategy or {"name": "finetune"})
    val, test = CountingLoader(), CountingLoader()
    result = Trainer(ToyModel(), build_strategy(cfg), ToyLoader(), val, test, cfg, run_dir).fit()
    return result, read_jsonl(run_dir / "metrics.jsonl"), val, test


def validated(records):
    return [r["epoch"] for r in records if "val_acc1" in r]


def test_val_every_validates_every_kth_epoch_and_always_the_last(tmp_path):
    result, records, val, _ = fit(tmp_path, val_every=2, max_epochs=5)
    assert validated(records) == [1, 3, 4] and len(val.passes) == 3
    assert result.state.best_epoch in (1, 3, 4)  # only a validated epoch can be the best
    assert [r["best"] for r in records if r["epoch"] not in (1, 3, 4)] == [False, False]
    assert all(r["val_time_s"] >= 0 for r in records if "val_acc1" in r)


def test_an_epoch_that_ends_training_early_is_validated(tmp_path):
    chain = {"name": "chain_thaw", "epochs_per_stage": 1, "patience": 5, "next_lr_mult": 0.1, "bn": "freeze"}
    _, records, _, _ = fit(tmp_path, chain, val_every=3, max_epochs=10)  # 4 stages of one epoch each
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert validated(records) == [2, 3]


def test_validation_and_test_are_capped_separately(tmp_path):
    result, _, val, test = fit(tmp_path, max_val_batches=1, max_test_batches=2, max_epochs=2)
    assert val.passes == [1, 1] and test.passes == [2]
    assert result.test["n"] == 16 and result.test_examples == 24  # 2 batches of 8, of the split's 24


def test_validates_and_val_every_checks():
    assert [e for e in range(7) if validates(e, 3, 7)] == [2, 5, 6]
    assert [e for e in range(3) if validates(e, 1, 3)] == [0, 1, 2]
    with pytest.raises(TransferCliError, match="trainer.val_every=0"):
        val_every(0)


def test_results_and_the_printed_line_say_where_the_time_went(tmp_path, capsys):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}"])
    results = json.loads((tmp_path / "results.json").read_text())
    spent = results["time"]
    assert set(spent) == {"wall_s", "data_s", "model_s", "setup_s", "train_s", "val_s", "test_s", "other_s"}
    assert spent["train_s"] == pytest.approx(results["train_time_s"])
    phases = sum(v for k, v in spent.items() if k not in ("wall_s", "other_s"))
    assert 0 < phases <= spent["wall_s"] and spent["other_s"] == pytest.approx(spent["wall_s"] - phases)
    assert results["test"]["n"] == 32 and results["test"]["of"] == 539  # trainer=smoke: 2 test batches of 16
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "on 32 of 539 test examples" in line and f"{spent['wall_s']:.1f}s" in line and "train " in line
