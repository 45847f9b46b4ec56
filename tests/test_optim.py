import math

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.engine.optim import (build_optimizer, load_state_by_name, lr_factor, slanted_triangular,
                                       state_by_name)
from transfer_cli.strategies.base import Strategy
from tests.toy import ToyModel


def sched(**kw):
    return OmegaConf.create(kw)


def test_stlr_matches_the_ulmfit_formula():
    total, cut_frac, ratio = 1000, 0.1, 32
    cut = 100
    assert slanted_triangular(0, total, cut_frac, ratio) == pytest.approx(1 / ratio)
    assert slanted_triangular(cut, total, cut_frac, ratio) == pytest.approx(1.0)
    t = 550  # halfway down the decay: p = 1 - 450 / (100 * 9) = 0.5
    assert slanted_triangular(t, total, cut_frac, ratio) == pytest.approx((1 + 0.5 * 31) / 32)
    assert slanted_triangular(total, total, cut_frac, ratio) == pytest.approx(1 / ratio)


def test_cosine_with_warmup():
    cfg = sched(name="cosine", warmup_epochs=1, min_lr_ratio=0.0)
    assert lr_factor(0, 100, 10, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_step_schedule():
    cfg = sched(name="step", warmup_epochs=0, step_epochs=2, gamma=0.1)
    assert lr_factor(19, 100, 10, cfg) == pytest.approx(1.0)
    assert lr_factor(20, 100, 10, cfg) == pytest.approx(0.1)


def rates(head_lr_mult, layer_decay, model=None):
    optim = OmegaConf.create({"head_lr_mult": head_lr_mult, "layer_decay": layer_decay})
    return {g["name"]: g["lr"] for g in Strategy(OmegaConf.create({}), optim).param_groups(model or ToyModel(), 0.01)}


def test_discriminative_rates_follow_ulmfit():
    """ULMFiT eq. 2: the group directly below the head trains at η / 2.6, each group below at its upper
    neighbour's rate / 2.6; the head at η."""
    groups = rates(head_lr_mult=1.0, layer_decay=2.6)
    assert groups["head"] == pytest.approx(0.01)
    assert groups["block"] == pytest.approx(0.01 / 2.6)
    assert groups["stem"] == pytest.approx(0.01 / 2.6**2)


def test_head_multiplier_scales_the_head_alone():
    """The body's rates decay from η whatever the head's multiplier."""
    groups = rates(head_lr_mult=10.0, layer_decay=2.6)
    assert groups["head"] == pytest.approx(0.1)
    assert groups["block"] == pytest.approx(0.01 / 2.6)
    assert groups["stem"] == pytest.approx(0.01 / 2.6**2)
    assert rates(head_lr_mult=10.0, layer_decay=1.0) == pytest.approx({"head": 0.1, "block": 0.01, "stem": 0.01})


def test_optimizer_state_follows_parameters_by_name_across_rebuilds():
    model = ToyModel()
    optim_cfg = OmegaConf.create({"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0,
                                  "head_lr_mult": 1.0, "layer_decay": 1.0})
    strategy = Strategy(OmegaConf.create({}), optim_cfg)
    opt = build_optimizer(strategy.param_groups(model, 0.1), optim_cfg)
    batch = {"pixel_values": torch.randn(2, 3, 8, 8), "labels": torch.tensor([0, 1])}
    torch.nn.functional.cross_entropy(model(batch), batch["labels"]).backward()
    opt.step()
    saved = state_by_name(opt, model)
    assert set(saved) == {n for n, _ in model.named_parameters()}
    model.set_trainable("stem", False)
    rebuilt = build_optimizer(strategy.param_groups(model, 0.1), optim_cfg)
    load_state_by_name(rebuilt, model, saved)
    head_w = model.head.weight
    assert torch.equal(rebuilt.state[head_w]["momentum_buffer"], opt.state[head_w]["momentum_buffer"])
    assert all(p not in rebuilt.state for p in model.group("stem").parameters(model))
