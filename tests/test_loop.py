"""The training loop on a hand-built model: freezing, determinism, NaN handling, checkpoints."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from tests.toy import ToyLoader, ToyModel, toy_config, without_timing


def fit(tmp_path, strategy="finetune", strategy_cfg=None, **trainer):
    torch.manual_seed(0)
    cfg = toy_config(**trainer)
    cfg.strategy = OmegaConf.create({"name": strategy, **(strategy_cfg or {})})
    model = ToyModel()
    trainer_ = Trainer(model, build_strategy(cfg), ToyLoader(), ToyLoader(shuffle=False), ToyLoader(shuffle=False),
                       cfg, tmp_path)
    return model, trainer_.fit()


def test_same_seed_same_numbers(tmp_path):
    _, a = fit(tmp_path / "a")
    _, b = fit(tmp_path / "b")
    assert a.test == b.test
    assert read_jsonl(tmp_path / "a" / "metrics.jsonl") and [
        r["train_loss"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")
    ] == [r["train_loss"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]


def test_linear_probe_leaves_the_body_bit_identical_bn_statistics_included(tmp_path):
    torch.manual_seed(0)
    before = ToyModel().state_dict()
    model, _ = fit(tmp_path, "freeze", {"groups": "all", "bn": "freeze"})
    after = model.state_dict()
    body_keys = [k for k in before if k.startswith("body.")]
    assert any("running_mean" in k for k in body_keys)
    assert all(torch.equal(before[k], after[k]) for k in body_keys)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["trainable_groups"] == ["head"] for r in records)
    assert all(set(r["lr"]) == {"head"} for r in records)


def test_bottom_k_freeze_with_bn_training(tmp_path):
    torch.manual_seed(0)
    before = ToyModel().state_dict()
    model, _ = fit(tmp_path, "freeze", {"groups": 1, "bn": "train"})
    after = model.state_dict()
    assert torch.equal(before["body.stem.0.weight"], after["body.stem.0.weight"])
    assert not torch.equal(before["body.stem.1.running_mean"], after["body.stem.1.running_mean"])
    assert not torch.equal(before["body.block.0.weight"], after["body.block.0.weight"])


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    fit(tmp_path, max_epochs=1)  # 3 steps per epoch
    last = tmp_path / "checkpoints" / "last.pt"
    good = last.read_bytes()
    cfg = toy_config(max_epochs=3, resume=True)
    cfg.optim.lr = float("nan")  # the first update poisons the weights: step 4 is finite, step 5 is not
    cfg.strategy = OmegaConf.create({"name": "finetune"})
    trainer = Trainer(ToyModel(), build_strategy(cfg), ToyLoader(), ToyLoader(), ToyLoader(), cfg, tmp_path)
    with pytest.raises(TransferCliError, match=r"NaN/inf at step 5 \(epoch 1\)"):
        trainer.fit()
    assert last.read_bytes() == good
    assert [r["epoch"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [0]


def test_existing_run_folder_needs_resume(tmp_path):
    fit(tmp_path, max_epochs=1)
    with pytest.raises(TransferCliError, match="trainer.resume=true"):
        fit(tmp_path, max_epochs=1)


class CrashingLoader(ToyLoader):
    """Dies in the middle of epoch `crash_epoch`, as a killed process would."""

    def __init__(self, crash_epoch: int):
        super().__init__()
        self.crash_epoch = crash_epoch

    def __iter__(self):
        for i, batch in enumerate(super().__iter__()):
            if self.epoch == self.crash_epoch and i == 1:
                raise KeyboardInterrupt
            yield batch


def test_resume_after_a_crash_mid_epoch_gives_the_uninterrupted_result(tmp_path):
    model_a, a = fit(tmp_path / "a", max_epochs=4)
    cfg = toy_config(max_epochs=4)
    cfg.strategy = OmegaConf.create({"name": "finetune"})
    torch.manual_seed(0)
    crashing = Trainer(ToyModel(), build_strategy(cfg), CrashingLoader(2), ToyLoader(shuffle=False),
                       ToyLoader(shuffle=False), cfg, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    model_b, b = fit(tmp_path / "b", max_epochs=4, resume=True)
    assert b.test == a.test
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert without_timing(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "b" / "metrics.jsonl"))
