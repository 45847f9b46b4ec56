"""L2-SP, DELTA and BSS: their formulas on hand-checkable tensors, the α = β = 0 identity with
fine-tuning, θ0 handling across training and resume, channel attention, and the CLI end to end."""
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.regularizers.terms import attended_feature_distance, spectral_shrinkage
from tests.test_loop import CrashingLoader
from tests.toy import ToyLoader, ToyModel, toy_config

L2SP = {"alpha": 0.1, "beta": 0.01, "bn_affine": True, "bss_weight": 0.0, "bss_k": 1}
DELTA = {"alpha": 0.01, "beta": 0.01, "attention": True, "layers": None, "attention_epochs": 2,
         "attention_batches": 2, "attention_lr": 0.01, "bss_weight": 0.0, "bss_k": 1}
CONFIGS = {"finetune": {}, "l2sp": L2SP, "delta": DELTA, "bss": {"weight": 0.001, "k": 1}}


def make(tmp_path, strategy, overrides=None, model=None, loader=None, weight_decay=1e-4, **trainer):
    torch.manual_seed(0)
    cfg = toy_config(**trainer)
    cfg.optim.weight_decay = weight_decay
    cfg.strategy = OmegaConf.create({"name": strategy, **CONFIGS[strategy], **(overrides or {})})
    model = model or ToyModel()
    return model, Trainer(model, build_strategy(cfg), loader or ToyLoader(), ToyLoader(shuffle=False),
                          ToyLoader(shuffle=False), cfg, tmp_path)


def fit(tmp_path, strategy, overrides=None, **kwargs):
    model, trainer = make(tmp_path, strategy, overrides, **kwargs)
    return model, trainer, trainer.fit()


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("strategy", ["l2sp", "delta"])
def test_zero_trade_offs_give_exactly_finetune(tmp_path, strategy):
    """Both replace weight decay, so the reference is fine-tuning without it."""
    model_f, _, f = fit(tmp_path / "f", "finetune", weight_decay=0.0)
    model_r, _, r = fit(tmp_path / "r", strategy, {"alpha": 0.0, "beta": 0.0}, weight_decay=0.0)
    assert r.test == f.test
    assert same_weights(model_f, model_r)


def test_l2sp_penalty_and_gradient_follow_the_formula(tmp_path):
    model, trainer = make(tmp_path, "l2sp", {"alpha": 0.3, "beta": 0.2})
    strategy = trainer.strategy
    strategy.setup(model, None, torch.device("cpu"))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    batch = next(iter(ToyLoader()))
    value = strategy.penalty(model, batch, model(batch))["l2sp"]
    body = [n for n in theta0 if n.startswith("body.")]
    head = [n for n in theta0 if n.startswith("head.")]
    params = dict(model.named_parameters())
    expected = 0.3 / 2 * sum(((params[n] - theta0[n]) ** 2).sum() for n in body) + \
        0.2 / 2 * sum((params[n] ** 2).sum() for n in head)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)
    value.backward()
    for n in body:
        torch.testing.assert_close(params[n].grad, 0.3 * (params[n] - theta0[n]))
    for n in head:
        torch.testing.assert_close(params[n].grad, 0.2 * params[n])


def test_l2sp_penalty_is_zero_at_the_start_and_skips_bn_affine_when_told(tmp_path):
    model, trainer = make(tmp_path, "l2sp", {"beta": 0.0, "bn_affine": False})
    trainer.strategy.setup(model, None, torch.device("cpu"))
    assert not any(".1." in n for n in trainer.strategy.regularizer("l2sp").theta0)  # stem.1 / block.1 are the BatchNorms
    batch = next(iter(ToyLoader()))
    assert trainer.strategy.penalty(model, batch, model(batch))["l2sp"].item() == 0.0


def test_l2sp_replaces_weight_decay_keeps_theta0_and_logs_its_penalty(tmp_path):
    start = ToyModel()
    torch.manual_seed(0)
    start = {n: p.detach().clone() for n, p in ToyModel().named_parameters()}
    model, trainer, _ = fit(tmp_path, "l2sp")
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups)
    assert all(torch.equal(w0, start[n]) for n, w0 in trainer.strategy.regularizer("l2sp").theta0.items())
    assert all(r["train_penalty/l2sp"] > 0 for r in read_jsonl(tmp_path / "metrics.jsonl"))


def test_large_alpha_stays_closer_to_theta0_than_finetune(tmp_path):
    torch.manual_seed(0)
    start = ToyModel().state_dict()

    def body_distance(model):
        return sum(((p - start[n]) ** 2).sum().item() for n, p in model.named_parameters() if n.startswith("body."))

    model_f, _, _ = fit(tmp_path / "f", "finetune")
    model_l, _, _ = fit(tmp_path / "l", "l2sp", {"alpha": 10.0})
    assert body_distance(model_l) < body_distance(model_f) / 2


def test_resume_restores_theta0_instead_of_snapshotting_the_rebuilt_model(tmp_path):
    model_a, _, a = fit(tmp_path / "a", "l2sp", max_epochs=4)
    _, crashing = make(tmp_path / "b", "l2sp", loader=CrashingLoader(2), max_epochs=4)
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    torch.manual_seed(123)  # the resumed model is built from other weights: setup snapshots those
    model_b, resumed = make(tmp_path / "b", "l2sp", model=ToyModel(), max_epochs=4, resume=True)
    torch.manual_seed(123)
    b = resumed.fit()
    assert all(torch.equal(resumed.strategy.regularizer("l2sp").theta0[n], w0) for n, w0 in crashing.strategy.regularizer("l2sp").theta0.items())
    assert b.test == a.test and same_weights(model_a, model_b)


def test_bss_is_the_sum_of_the_k_smallest_squared_singular_values():
    features = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    assert spectral_shrinkage(features, 1).item() == pytest.approx(0.25)
    assert spectral_shrinkage(features, 2).item() == pytest.approx(4.25)


def test_bss_uses_the_features_of_the_training_forward(tmp_path):
    model, trainer = make(tmp_path, "bss", {"weight": 2.0})
    batch = next(iter(ToyLoader()))
    model.train()
    with trainer.strategy.observing(model):
        logits = trainer.strategy.forward(model, batch)
    torch.testing.assert_close(logits, model(batch))
    value = trainer.strategy.penalty(model, batch, logits)["bss"]
    expected = 2.0 * torch.linalg.svdvals(model.features(batch)).min() ** 2
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bss_combines_with_l2sp(tmp_path):
    fit(tmp_path, "l2sp", {"bss_weight": 0.001}, max_epochs=1)
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert record["train_penalty/l2sp"] > 0 and record["train_penalty/bss"] > 0


def test_feature_map_distance_handles_conv_and_token_maps():
    fm0 = torch.zeros(2, 3, 2, 2)
    fm = torch.zeros(2, 3, 2, 2)
    fm[:, 1] = 1.0  # channel 1 moved by 1 at every position: ‖·‖² = 4 per example
    w = torch.tensor([0.2, 0.5, 0.3])
    assert attended_feature_distance([fm], [fm0], [w]).item() == pytest.approx(0.5 * 3 / 4 * 2 * 0.5 * 4)
    tokens = fm.flatten(2).transpose(1, 2)  # (B, T=4, D=3): the same units as hidden dims
    assert attended_feature_distance([tokens], [tokens * 0], [w]).item() == pytest.approx(0.5 * 3 / 4 * 2 * 0.5 * 4)
    pooled = fm.mean(dim=(2, 3))  # (B, C): pooled features, a 1x1 map (ConvNeXt's last group)
    assert attended_feature_distance([pooled], [pooled * 0], [w]).item() == pytest.approx(0.5 * 3 / 1 * 2 * 0.5 * 1)


class OneChannelModel(ToyModel):
    """The label lives in channel 0 of the block's output; channels 1..3 are exactly zero."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            for conv in (self.body.stem[0], self.body.block[0]):
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[0, 0, 1, 1] = 1.0


def test_delta_attention_is_a_distribution_that_favours_the_channel_that_matters(tmp_path):
    model, trainer = make(tmp_path, "delta", {"attention_epochs": 5, "attention_lr": 0.5}, model=OneChannelModel())
    trainer.strategy.setup(model, ToyLoader(), torch.device("cpu"))
    (attention,) = trainer.strategy.regularizer("delta").attention
    assert (attention >= 0).all() and attention.sum().item() == pytest.approx(1.0)
    assert attention[0] > attention[1:].max()
    assert all(p.requires_grad is False for p in trainer.strategy.regularizer("delta").reference.parameters())


def test_delta_without_attention_weighs_channels_equally_and_resumes_its_state(tmp_path):
    model, trainer, _ = fit(tmp_path, "delta", {"attention": False}, max_epochs=1)
    assert torch.equal(trainer.strategy.regularizer("delta").attention[0], torch.full((4,), 0.25))
    assert all(g["weight_decay"] == 0.0 for g in trainer.optimizer.param_groups)
    record = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert record["train_penalty/delta"] > 0 and record["train_penalty/delta_head"] > 0
    state = trainer.strategy.state_dict()
    _, other = make(tmp_path / "o", "delta", {"attention": False}, model=ToyModel())
    other.strategy.setup(ToyModel(), ToyLoader(), torch.device("cpu"))
    other.strategy.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.strategy.regularizer("delta").reference.state_dict().values(),
                                                 trainer.strategy.regularizer("delta").reference.state_dict().values()))


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [
    ("l2sp", []), ("bss", []), ("delta", ["strategy.attention_epochs=1", "strategy.attention_batches=1"])])
def test_cli_trains_and_evaluates_each_regulariser(tmp_path, strategy, extra, monkeypatch):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", f"strategy={strategy}", *extra])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["strategy"] == strategy
    assert all(f"train_penalty/{strategy}" in r for r in read_jsonl(tmp_path / "metrics.jsonl"))

    def no_recompute(*args, **kwargs):
        raise AssertionError("eval recomputed DELTA's attention instead of loading it")

    monkeypatch.setattr("transfer_cli.strategies.delta.train_probe", no_recompute)
    main(["eval", f"run={tmp_path}"])
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == results["test"]


@pytest.mark.slow
def test_channel_ablation_runs_only_the_layers_above_and_equals_whole_forwards(monkeypatch):
    from transfer_cli.backbones import build_backbone
    from transfer_cli.backbones.model import TransferModel
    from transfer_cli.strategies.regularizers.delta import ablation_losses

    torch.manual_seed(0)
    cfg = OmegaConf.create({"kind": "timm", "name": "test_resnet", "pretrained": False, "weights": None,
                            "image_size": 16, "drop_rate": 0.0})
    model = build_backbone(cfg, num_classes=3).eval()
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        assert model.runs_from(["stem", "layer1", "layer2"], batch)
        above_only = ablation_losses(model, "layer2", batch)
        monkeypatch.setattr(TransferModel, "runs_from", lambda *args: False)
        whole = ablation_losses(model, "layer2", batch)
        channels = model.group_output(batch, "layer2").shape[1]
    assert above_only.shape == (channels,)
    assert torch.allclose(above_only, whole, atol=1e-5)
    assert not torch.allclose(above_only, above_only[0].expand_as(above_only))  # channels matter differently
