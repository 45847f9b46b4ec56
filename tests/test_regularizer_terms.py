"""Regularizer terms held by any strategy: the flat strategies equal their composed form bit for bit, a
schedule with two terms adds exactly their sum to the loss, and the combinations that cannot work are
refused in one line."""
import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.engine.loop import StrategyStep, Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from tests.test_loop import CrashingLoader
from tests.toy import ToyLoader, ToyModel, toy_config, without_timing

TERMS = {
    "l2sp": {"alpha": 0.1, "beta": 0.01, "bn_affine": True},
    "delta": {"alpha": 0.01, "beta": 0.01, "attention": True, "layers": None, "attention_epochs": 2,
              "attention_batches": 2, "attention_lr": 0.01},
    "bss": {"weight": 0.001, "k": 1},
}
SCHEDULE = {"name": "gradual_unfreeze", "unfreeze_every": 1, "bn": "freeze", "cache_features": "auto"}


def config(strategy: dict, regularizers: dict | None = None, **trainer):
    cfg = toy_config(**trainer)
    cfg.strategy = OmegaConf.create(strategy)
    if regularizers:
        cfg.regularizers = OmegaConf.create(regularizers)
    return cfg


def fit(tmp_path, cfg, loader=None, model=None):
    torch.manual_seed(0)
    model = model or ToyModel()
    trainer = Trainer(model, build_strategy(cfg), loader or ToyLoader(), ToyLoader(shuffle=False),
                      ToyLoader(shuffle=False), cfg, tmp_path)
    return model, trainer, trainer.fit()


@pytest.mark.parametrize("term", ["l2sp", "delta", "bss"])
def test_flat_strategy_equals_finetune_holding_the_term(tmp_path, term):
    flat_model, _, flat = fit(tmp_path / "flat", config({"name": term, **TERMS[term]}))
    held_model, _, held = fit(tmp_path / "held", config({"name": "finetune"}, {term: TERMS[term]}))
    assert flat.test == held.test
    assert all(torch.equal(a, b) for a, b in zip(flat_model.state_dict().values(), held_model.state_dict().values()))
    assert learning_record(tmp_path / "flat") == learning_record(tmp_path / "held")


def learning_record(run_dir):
    """metrics.jsonl without its wall-clock fields."""
    return without_timing(read_jsonl(run_dir / "metrics.jsonl"))


def test_a_schedule_with_two_terms_adds_exactly_their_sum(tmp_path):
    cfg = config(SCHEDULE, {"l2sp": {**TERMS["l2sp"], "alpha": 0.5}, "bss": {"weight": 0.3, "k": 1}})
    torch.manual_seed(0)
    model = ToyModel()
    strategy = build_strategy(cfg)
    assert [t.name for t in strategy.regularizers] == ["l2sp", "bss"]
    strategy.setup(model, ToyLoader(), torch.device("cpu"))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    strategy.on_epoch_start(1, model)  # head and block train, the stem is frozen
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.train()
    batch = next(iter(ToyLoader()))
    logits, penalties = StrategyStep(model, strategy, strategy.forward, [])(batch)
    params = dict(model.named_parameters())
    block = [n for n in params if n.startswith("body.block.")]
    head = [n for n in params if n.startswith("head.")]
    l2sp = 0.5 / 2 * sum(((params[n] - theta0[n]) ** 2).sum() for n in block) + \
        0.01 / 2 * sum((params[n] ** 2).sum() for n in head)
    bss = 0.3 * torch.linalg.svdvals(model.features(batch)).min() ** 2
    assert set(penalties) == {"l2sp", "bss"}
    assert penalties["l2sp"].item() == pytest.approx(l2sp.item(), rel=1e-6)
    assert penalties["bss"].item() == pytest.approx(bss.item(), rel=1e-5)
    total = F.cross_entropy(logits, batch["labels"]) + sum(penalties.values())
    expected = F.cross_entropy(model(batch), batch["labels"]) + l2sp + bss
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_terms_resume_exactly_inside_a_schedule(tmp_path):
    regularizers = {"l2sp": TERMS["l2sp"], "bss": TERMS["bss"]}
    model_a, _, a = fit(tmp_path / "a", config(SCHEDULE, regularizers, max_epochs=4))
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", config(SCHEDULE, regularizers, max_epochs=4), loader=CrashingLoader(2))
    torch.manual_seed(123)  # the model is rebuilt from other weights: θ0 must come from the checkpoint
    model_b, resumed, b = fit(tmp_path / "b", config(SCHEDULE, regularizers, max_epochs=4, resume=True),
                              model=ToyModel())
    assert b.test == a.test
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_delta_turns_the_feature_cache_off_and_refuses_it_when_required(tmp_path):
    freeze = {"name": "freeze", "groups": 1, "bn": "freeze", "cache_features": "auto"}
    _, trainer, _ = fit(tmp_path, config(freeze, {"delta": TERMS["delta"]}, max_epochs=1))
    assert trainer.strategy.cache.setting is False
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["train_penalty/delta"] > 0
    with pytest.raises(TransferCliError, match="cache_features=true cannot serve regularizer delta"):
        build_strategy(config({**freeze, "cache_features": True}, {"delta": TERMS["delta"]}))


def test_routing_refuses_terms_and_a_term_cannot_be_held_twice():
    spottune = {"name": "spottune", "shared": "train", "temperature": 5.0}
    with pytest.raises(TransferCliError, match="strategy=spottune cannot hold regularizers"):
        build_strategy(config(spottune, {"bss": TERMS["bss"]}))
    with pytest.raises(TransferCliError, match="regularizer l2sp is given twice"):
        build_strategy(config({"name": "l2sp", **TERMS["l2sp"]}, {"l2sp": TERMS["l2sp"]}))


def test_cli_runs_gradual_unfreezing_with_l2sp_and_bss(tmp_path):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", "strategy=gradual_unfreeze",
          "regularizers=[l2sp,bss]", "regularizers.bss.weight=0.01"])
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(r["train_penalty/l2sp"] >= 0 and r["train_penalty/bss"] > 0 for r in records)
    assert any(r["train_penalty/l2sp"] > 0 for r in records)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test"]["n"] > 0
