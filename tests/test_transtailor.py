"""TransTailor: exact structural removal, the paper's importance, the size targets, eval and resume."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tests.toy import ToyLoader, ToyModel, toy_config
from tests.test_loop import CrashingLoader
from transfer_cli.backbones import build_backbone
from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.pruning import cnn, transformer

TINY = {"alpha": {"epochs": 1, "recovery_epochs": 1, "lr": 0.05, "momentum": 0.9}}


def strategy_cfg(target="flops", ratio=0.3, step=0.1, max_acc_drop=None, **alpha):
    return {"name": "transtailor", "prune": {"target": target, "ratio": ratio, "step": step,
                                              "max_acc_drop": max_acc_drop},
            "alpha": {**TINY["alpha"], **alpha}}


def transtailor(**kwargs):
    return build_strategy(OmegaConf.create({"strategy": strategy_cfg(**kwargs), "optim": {}}))


def tiny_resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = OmegaConf.create({"kind": "timm", "name": "test_resnet", "pretrained": False, "weights": None,
                            "image_size": 16, "drop_rate": 0.0})
    model = build_backbone(cfg, 3, pretrained=False)
    for m in model.modules():  # non-trivial BatchNorm statistics and shifts
        if isinstance(m, cnn.BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_removal_is_exact_on_a_residual_network():
    """Masking the chosen channels (α = 0 after their BatchNorms) and removing them give the same
    logits, through residual additions; folding α into BatchNorm changes nothing either."""
    model = tiny_resnet()
    images = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    graph = cnn.dependency_graph(model)
    groups = cnn.channel_groups(model, graph)
    assert any(len(g.norms) > 1 for g in groups), "no residual-coupled group: the test would prove less"
    alpha = cnn.ScalingFactors(groups)
    generator = torch.Generator().manual_seed(2)
    for a in alpha.parameters():
        a.data = torch.rand(a.shape, generator=generator) + 0.5
    importance = {g.name: torch.rand(g.size, generator=generator) for g in groups}
    plan = cnn.least_important(importance, sum(g.size for g in groups) // 3)
    with torch.no_grad():
        for name, channels in plan.items():
            alpha.alpha[name][channels] = 0.0
        masked = model({"pixel_values": images})
    params, flops = cnn.count_params(model), cnn.count_flops(model)

    sizes = {g.name: g.size for g in groups}
    alpha.remove()
    cnn.remove_channels(model, graph, plan)
    for name, channels in plan.items():
        kept = torch.ones(sizes[name], dtype=torch.bool)
        kept[channels] = False
        alpha.keep(name, kept)
    groups = cnn.channel_groups(model, graph)
    alpha.attach(groups)
    with torch.no_grad():
        pruned = model({"pixel_values": images})
        alpha.fold(groups)
        folded = model({"pixel_values": images})

    assert cnn.count_params(model) < 0.8 * params and cnn.count_flops(model) < 0.8 * flops
    assert [g.size for g in groups] == [sizes[g.name] - len(plan.get(g.name, [])) for g in groups]
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, masked, rtol=1e-5, atol=1e-5)


def test_importance_is_the_layer_normalised_taylor_term_of_the_paper():
    """Θ_c = |α_c ∂L/∂α_c|, divided by the ℓ2 norm of Θ over its layer; ∂L/∂α by central differences
    of the mean training loss, so autograd and the hooks are checked too."""
    torch.manual_seed(0)
    model = ToyModel(width=4).double().eval()
    loader = ToyLoader(n=16, batch_size=8)
    loader.images = loader.images.double()
    strategy = transtailor()
    graph = cnn.dependency_graph(model)
    groups = cnn.channel_groups(model, graph)
    assert sorted(g.name for g in groups) == ["body.block.0", "body.stem.0"]
    alpha = cnn.ScalingFactors(groups)
    with torch.no_grad():
        for a in alpha.parameters():
            a.copy_(torch.linspace(0.2, 1.4, a.numel(), dtype=torch.float64))
        alpha.alpha["body.block.0"][2] = 0.0  # a switched-off filter: importance 0, ranked first

    def mean_loss() -> float:
        total = sum(F.cross_entropy(model(b), b["labels"], reduction="sum").item() for b in loader)
        return total / loader.num_samples

    grads = strategy._alpha_grad(model, alpha, loader, torch.device("cpu"))
    importance = cnn.taylor_importance(alpha.alpha, grads)
    h = 1e-6
    for name, a in alpha.alpha.items():
        expected = torch.zeros_like(a)
        for c in range(a.numel()):
            with torch.no_grad():
                a[c] += h
                up = mean_loss()
                a[c] -= 2 * h
                down = mean_loss()
                a[c] += h
            expected[c] = abs(a[c].item() * (up - down) / (2 * h))
        expected = expected / expected.norm()
        torch.testing.assert_close(importance[name], expected, rtol=1e-4, atol=1e-7)
    assert importance["body.block.0"][2] == 0
    order = sorted(((float(s), n, c) for n, v in importance.items() for c, s in enumerate(v)
                    if c != int(v.argmax())))
    assert cnn.least_important(importance, 3) == {
        n: sorted(c for _, m, c in order[:3] if m == n) for n in {m for _, m, _ in order[:3]}}
    assert cnn.least_important(importance, 1) == {"body.block.0": [2]}


@pytest.mark.parametrize("target", ["filters", "params", "flops"])
def test_pruning_stops_at_the_first_round_that_reaches_the_ratio(target):
    torch.manual_seed(0)
    model = ToyModel(width=16)
    strategy = transtailor(target=target, ratio=0.4, step=0.1)
    params, flops = cnn.count_params(model), cnn.count_flops(model)
    strategy.setup(model, ToyLoader(), torch.device("cpu"))
    summary = strategy.results()["pruning"]
    assert (summary["params_before"], summary["flops_before"]) == (params, flops)
    assert summary["params_after"] == cnn.count_params(model) < params
    assert summary["flops_after"] == cnn.count_flops(model) < flops
    after = {"filters": summary["filters_after"] / summary["filters_before"],
             "params": summary["params_after"] / params, "flops": summary["flops_after"] / flops}[target]
    rounds = summary["reduction_per_round"]
    assert rounds[-1] == pytest.approx(1 - after)
    assert summary["stopped_by"] == "target"
    assert rounds[-1] >= 0.4 and (len(rounds) == 1 or rounds[-2] < 0.4)  # reached, by the last round only
    if target == "filters":
        assert summary["filters_before"] - summary["filters_after"] == math.ceil(0.4 * summary["filters_before"])
    assert all(p.requires_grad for p in model.parameters())  # stage 2 fine-tunes everything
    assert model.head.in_features == model.feature_dim < 16


def test_accuracy_bound_stops_before_the_round_that_would_cost_too_much():
    """With max_acc_drop, each round's removal is first tried as a mask (α = 0, exact by the test
    above); the round whose masked accuracy falls too far is not done. Accuracies are scripted here."""
    torch.manual_seed(0)
    strategy = transtailor(target="filters", ratio=0.9, step=0.25, max_acc_drop=0.1, recovery_epochs=0)
    scripted = iter([0.9, 0.85, 0.75])  # reference after training α, then round 1 (-0.05), round 2 (-0.15)
    strategy._accuracy = lambda model, loader, device: next(scripted)
    model = ToyModel(width=8)
    strategy.setup(model, ToyLoader(), torch.device("cpu"))
    summary = strategy.results()["pruning"]
    assert summary["stopped_by"] == "max_acc_drop"
    assert summary["filters_before"] - summary["filters_after"] == 4  # round 1 only: 25% of the 16 filters
    assert len(summary["reduction_per_round"]) == 1


def bert(folder) -> torch.nn.Module:
    cfg = OmegaConf.create({"kind": "hf", "name": str(folder), "pretrained": True, "weights": None,
                            "drop_rate": 0.0, "pooling": "mean", "trust_remote_code": False})
    return build_backbone(cfg, 2).eval()


def test_bad_settings_and_unknown_layouts_are_one_clear_error(tiny_bert):
    with pytest.raises(TransferCliError, match="prune.target"):
        transtailor(target="channels")
    with pytest.raises(TransferCliError, match="prune.ratio"):
        transtailor(ratio=1.0)
    text = bert(tiny_bert)
    text.body.encoder.layer[1].intermediate = torch.nn.Identity()  # neither a CNN nor a BERT-like layer
    with pytest.raises(TransferCliError, match="BERT-like encoders"):
        transtailor().setup(text, ToyLoader(), torch.device("cpu"))


def test_heads_and_ffn_units_are_removed_exactly_and_replay(tiny_bert):
    """Setting α of chosen heads / FFN units to 0 and removing them give the same logits; folding α
    changes nothing; replaying the history on a fresh model rebuilds the structure the weights fit."""
    model = bert(tiny_bert)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(5, 100, (3, 9), generator=g),
             "attention_mask": torch.ones(3, 9, dtype=torch.long)}
    batch["attention_mask"][0, 6:] = 0
    graph = transformer.dependency_graph(model)
    groups = transformer.channel_groups(model, graph)
    layer = "body.encoder.layer"
    assert [(x.name, x.size) for x in groups] == [(f"{layer}.0.attention", 2), (f"{layer}.0.intermediate", 37),
                                                 (f"{layer}.1.attention", 2), (f"{layer}.1.intermediate", 37)]
    alpha = transformer.ScalingFactors(groups)
    for a in alpha.parameters():
        a.data = torch.rand(a.shape, generator=g) + 0.5
    plan = {f"{layer}.0.attention": [1], f"{layer}.0.intermediate": [0, 5, 36],
            f"{layer}.1.attention": [0], f"{layer}.1.intermediate": list(range(0, 37, 2))}
    with torch.no_grad():
        for name, units in plan.items():
            alpha.alpha[name][units] = 0.0
        masked = model(batch)
    params, flops = cnn.count_params(model), transformer.count_flops(model)
    strategy = transtailor()
    strategy.ops = transformer
    strategy._remove(model, graph, alpha, plan)
    groups = transformer.channel_groups(model, graph)
    with torch.no_grad():
        pruned = model(batch)
        alpha.fold(groups)
        folded = model(batch)
    assert [x.size for x in groups] == [1, 34, 1, 18]
    assert model.body.encoder.layer[0].attention.self.num_attention_heads == 1
    assert cnn.count_params(model) < params and transformer.count_flops(model) < flops
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded, masked, rtol=1e-5, atol=1e-5)

    fresh = bert(tiny_bert)
    transformer.replay(fresh, transformer.history_of(graph))
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), masked, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_tiny_bert_prunes_end_to_end_and_eval_reproduces_it(tmp_path, tiny_bert):
    csv = tmp_path / "train.csv"
    rows = ["text,label"] + [f"the cat sat on the mat {i},cat" for i in range(8)] + \
        [f"a dog ran fast {i},dog" for i in range(8)]
    csv.write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={run}", "backbone=hf",
          f"backbone.weights={tiny_bert}", "data=csv_text", f"data.train_file={csv}", "optim=adamw",
          "strategy=transtailor", "strategy.prune.target=filters", "strategy.prune.ratio=0.3",
          "strategy.prune.step=0.2", "strategy.alpha.epochs=1", "strategy.alpha.recovery_epochs=1"])
    results = json.loads((run / "results.json").read_text())
    summary = results["pruning"]
    assert summary["filters_before"] == 2 * (2 + 37)
    assert summary["filters_before"] - summary["filters_after"] == math.ceil(0.3 * summary["filters_before"])
    assert summary["params_after"] == results["params"]["total"] < summary["params_before"]
    assert summary["flops_after"] < summary["flops_before"]
    main(["eval", f"run={run}"])
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["test"]["acc1"] == results["test"]["acc1"]
    assert evaluated["test"]["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)


@pytest.mark.slow
def test_resume_rebuilds_the_pruned_structure_and_ends_like_an_uninterrupted_run(tmp_path):
    def trainer(folder, loader, **options):
        torch.manual_seed(0)
        cfg = toy_config(max_epochs=4, **options)
        cfg.strategy = OmegaConf.create(strategy_cfg(target="filters", ratio=0.5, step=0.5, recovery_epochs=0))
        model = ToyModel(width=8)
        return model, Trainer(model, build_strategy(cfg), loader, ToyLoader(shuffle=False),
                              ToyLoader(shuffle=False), cfg, folder)

    model_a, whole = trainer(tmp_path / "a", ToyLoader())
    a = whole.fit()
    _, crashing = trainer(tmp_path / "b", CrashingLoader(2))
    with pytest.raises(KeyboardInterrupt):
        crashing.fit()
    model_b, resumed = trainer(tmp_path / "b", ToyLoader(), resume=True)
    resumed.strategy._prune = None  # stage 1 must not run again: the saved structure is replayed
    b = resumed.fit()
    assert b.test == a.test
    assert model_b.head.in_features == model_a.head.in_features == 4
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))


@pytest.mark.slow
def test_eval_of_a_pruned_run_reproduces_its_test_numbers(tmp_path):
    run = tmp_path / "run"
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={run}", "strategy=transtailor",
          "strategy.prune.target=params", "strategy.prune.ratio=0.2", "strategy.prune.step=0.2",
          "strategy.alpha.epochs=1", "strategy.alpha.recovery_epochs=0"])
    results = json.loads((run / "results.json").read_text())
    assert results["pruning"]["params_after"] == results["params"]["total"] < results["pruning"]["params_before"]
    assert results["pruning"]["flops_after"] < results["pruning"]["flops_before"]
    main(["eval", f"run={run}"])
    evaluated = json.loads((run / "eval.json").read_text())
    assert evaluated["test"]["acc1"] == results["test"]["acc1"]
    assert evaluated["test"]["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)
