"""`transfer-cli analyze`: CKA's properties, exact interpolation curves, BatchNorm recomputation,
rewinding (criticality) and the feature spectrum, on hand-built models and one smoke run."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from transfer_cli.analysis.batchnorm import evaluate_state, recompute_bn_stats
from transfer_cli.analysis.cka import analyze_cka, linear_cka, pool_output
from transfer_cli.analysis.criticality import group_state_keys, relative_distance, rewind_drops
from transfer_cli.analysis.interpolate import interpolation_curve, lambda_grid, loss_barrier
from transfer_cli.analysis.runs import (LoadedRun, clone_state, initial_state, lerp_state, load_run,
                                        pretrained_state, take_batches)
from transfer_cli.analysis.spectrum import analyze_spectrum
from transfer_cli.backbones.model import TransferModel
from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.engine.run import Assembled, assemble
from transfer_cli.run_folder import run_config
from transfer_cli.strategies import build_strategy
from tests.toy import ToyLoader, ToyModel, toy_config

CPU = torch.device("cpu")


# ---- CKA ---------------------------------------------------------------------------------------
def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Reference: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC(K, L) = tr(KHLH) / (n-1)², H = I - 11ᵀ/n."""
    x, y = x.double(), y.double()
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    k, l = x @ x.T, y @ y.T

    def hsic(a, b):
        return torch.trace(a @ h @ b @ h) / (n - 1) ** 2

    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


@pytest.mark.parametrize("n,dx,dy", [(30, 5, 8), (10, 50, 40)])
def test_cka_matches_the_hsic_reference(n, dx, dy):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dx, generator=g)
    y = x[:, :1] * 2 + 0.5 * torch.randn(n, dy, generator=g)  # related, not identical
    value = linear_cka(x, y)
    assert 0.05 < value < 0.99
    assert value == pytest.approx(hsic_cka(x, y), abs=1e-10)


def test_cka_is_one_for_identical_features_and_invariant_to_rotation_scale_and_offset():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randn(40, 6, generator=g, dtype=torch.float64) + x
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.5 * x, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(x + 3.0, y) == pytest.approx(base, abs=1e-10)
    # but not to an anisotropic rescaling of the columns
    assert abs(linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1, 0.1]), y) - base) > 1e-3


def test_cka_flattens_maps_or_averages_their_positions():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert pool_output(maps, "flatten").shape == (2, 12)
    assert torch.equal(pool_output(maps, "mean"), maps.mean(dim=(2, 3)))
    tokens = torch.randn(2, 5, 4)
    assert torch.equal(pool_output(tokens, "mean"), tokens.mean(dim=1))


# ---- hand-built runs -------------------------------------------------------------------------------
class LinearModel(TransferModel):
    """x -> head(lin(x)): logits are a known function of the weights, for an exact interpolation curve."""

    def __init__(self):
        body = nn.Module()
        body.lin = nn.Linear(4, 4)
        super().__init__(body=body, head=nn.Linear(4, 3), group_modules={"lin": [body.lin]}, block_names=[],
                         feature_dim=4, modality="image", preprocessing={})

    def features(self, batch):
        return self.body.lin(batch["pixel_values"])


def toy_run(model: TransferModel, tmp_path: Path, strategy_name: str = "finetune", **strategy) -> LoadedRun:
    cfg = toy_config()
    cfg.strategy = OmegaConf.create({"name": strategy_name, **strategy})
    run = Assembled(None, model, build_strategy(cfg), {"train": ToyLoader(), "test": ToyLoader(shuffle=False)})
    return LoadedRun(cfg, tmp_path, run, 0, CPU, "fp32", clone_state(model))


def test_interpolation_curve_is_exact_for_a_linear_model(tmp_path):
    torch.manual_seed(0)
    a, b = LinearModel().state_dict(), LinearModel().state_dict()
    loaded = toy_run(LinearModel(), tmp_path)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 4, generator=g), torch.randint(0, 3, (20,), generator=g)
    test = [{"pixel_values": x[:12], "labels": y[:12]}, {"pixel_values": x[12:], "labels": y[12:]}]
    lambdas = lambda_grid(5)
    assert lambdas == [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = interpolation_curve(loaded, a, b, lambdas, test, train=[])
    expected_losses = []
    for lam, row in zip(lambdas, rows):
        w = {k: (1 - lam) * a[k] + lam * b[k] for k in a}
        logits = (x @ w["body.lin.weight"].T + w["body.lin.bias"]) @ w["head.weight"].T + w["head.bias"]
        expected_losses.append(F.cross_entropy(logits, y).item())
        assert row["lambda"] == lam
        assert row["loss"] == pytest.approx(expected_losses[-1], rel=1e-5)
        assert row["acc1"] == (logits.argmax(1) == y).sum().item() / len(y)
    # the curve is not a straight line between its ends, so the check above can tell paths apart
    middle = 0.5 * (expected_losses[0] + expected_losses[-1])
    assert abs(expected_losses[2] - middle) > 1e-3
    assert torch.equal(loaded.model.head.weight, loaded.final["head.weight"])  # the run's weights are put back


def test_lerp_state_is_exact_at_both_ends_and_keeps_integer_buffers():
    torch.manual_seed(0)
    a, b = ToyModel().state_dict(), ToyModel().state_dict()
    b["body.stem.1.num_batches_tracked"] += 5
    assert all(torch.equal(lerp_state(a, b, 0.0)[k], a[k]) for k in a if a[k].is_floating_point())
    assert all(torch.equal(lerp_state(a, b, 1.0)[k], b[k]) for k in a)
    assert torch.equal(lerp_state(a, b, 0.0)["body.stem.1.num_batches_tracked"], b["body.stem.1.num_batches_tracked"])
    only_head = lerp_state(a, b, 0.0, keys=["head.weight"])
    assert torch.equal(only_head["head.weight"], a["head.weight"])
    assert torch.equal(only_head["head.bias"], b["head.bias"])


def test_loss_barrier_is_the_excess_over_the_chord():
    rows = [{"lambda": 0.0, "loss": 1.0}, {"lambda": 0.5, "loss": 2.5}, {"lambda": 1.0, "loss": 2.0}]
    assert loss_barrier(rows) == pytest.approx(1.0)  # 2.5 - 1.5
    assert loss_barrier([{"lambda": 0.0, "loss": 1.0}, {"lambda": 1.0, "loss": 0.5}]) == 0.0


def test_batchnorm_statistics_are_the_cumulative_average_over_training_batches(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    model.set_trainable("stem", False)  # frozen statistics are recomputed too: the weights changed
    loaded = toy_run(model, tmp_path)
    bn = model.body.stem[1]
    bn.running_mean.fill_(5.0)
    images = ToyLoader().images
    batches = [{"pixel_values": images[:16], "labels": torch.zeros(16, dtype=torch.long)},
               {"pixel_values": images[16:], "labels": torch.zeros(8, dtype=torch.long)}]
    recompute_bn_stats(loaded, batches)
    with torch.no_grad():
        pre = [model.body.stem[0](b["pixel_values"]) for b in batches]
    expected_mean = torch.stack([p.mean(dim=(0, 2, 3)) for p in pre]).mean(0)
    expected_var = torch.stack([p.transpose(0, 1).flatten(1).var(dim=1) for p in pre]).mean(0)
    assert torch.allclose(bn.running_mean, expected_mean, atol=1e-6)
    assert torch.allclose(bn.running_var, expected_var, atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training


def test_interpolation_endpoints_equal_each_endpoint_evaluated_the_same_way(tmp_path):
    torch.manual_seed(0)
    a, b = ToyModel().state_dict(), ToyModel().state_dict()
    loaded = toy_run(ToyModel(), tmp_path)
    test, train = list(ToyLoader(shuffle=False)), list(ToyLoader())
    rows = interpolation_curve(loaded, a, b, lambda_grid(3), test, train)
    assert rows[0]["loss"] == evaluate_state(loaded, a, test, train)["loss"]
    assert rows[-1]["loss"] == evaluate_state(loaded, b, test, train)["loss"]
    assert rows[0]["acc1"] == evaluate_state(loaded, a, test, train)["acc1"]
    assert rows[0]["loss"] != rows[1]["loss"] != rows[2]["loss"]


def test_group_state_keys_cover_parameters_and_batchnorm_buffers():
    model = ToyModel()
    keys = {g.name: group_state_keys(model, g) for g in model.groups()}
    assert "body.stem.1.running_mean" in keys["stem"] and "body.stem.0.weight" in keys["stem"]
    assert sorted(k for ks in keys.values() for k in ks) == sorted(model.state_dict())


def test_relative_distance_is_how_far_training_moved_a_group():
    initial = {"w": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0])}
    final = {"w": torch.tensor([3.0, 6.5]), "b": torch.tensor([0.0])}
    assert relative_distance(initial, final, ["w", "b"]) == pytest.approx(0.5)
    assert relative_distance(initial, initial, ["w"]) == 0.0


def test_rewinding_the_head_costs_accuracy_and_a_frozen_group_costs_nothing(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(num_classes=2, width=8)
    initial = clone_state(model)
    cfg = toy_config(max_epochs=5)
    cfg.optim.lr = 0.5
    cfg.strategy = OmegaConf.create({"name": "freeze", "groups": ["stem"], "bn": "freeze"})
    Trainer(model, build_strategy(cfg), ToyLoader(), ToyLoader(shuffle=False), ToyLoader(shuffle=False),
            cfg, tmp_path).fit()
    # a head that starts as the negated trained head: on two classes it flips every prediction at α = 0,
    # and at α = 0.5 it is exactly zero, so every example gets class 0
    initial["head.weight"], initial["head.bias"] = -model.head.weight.detach(), -model.head.bias.detach()
    loaded = toy_run(model, tmp_path, "freeze", groups=["stem"], bn="freeze")
    test = list(ToyLoader(shuffle=False))
    trained, drops = rewind_drops(loaded, initial, test, train=list(ToyLoader()))
    labels = torch.cat([b["labels"] for b in test])
    assert trained >= 0.75
    assert drops["head"][0] == pytest.approx(trained - (1 - trained))
    assert drops["head"][2] == pytest.approx(trained - (labels == 0).float().mean().item())
    assert drops["stem"] == [0.0, 0.0, 0.0, 0.0]
    assert drops["block"][0] > 0  # the trained block matters too
    assert torch.equal(model.head.weight, loaded.final["head.weight"])  # the run's weights are put back


# ---- a real run, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def frozen_run(tmp_path_factory) -> Path:
    """Quickstart smoke run with the bottom two groups (stem, layer1) frozen, BatchNorm included."""
    run_dir = tmp_path_factory.mktemp("runs") / "freeze2"
    main(["train", "trainer=smoke", "trainer.device=cpu", "strategy=freeze", "strategy.groups=2",
          f"hydra.run.dir={run_dir}"])
    return run_dir


@pytest.fixture(scope="module")
def loaded(frozen_run) -> LoadedRun:
    return load_run(run_config(frozen_run, {}), frozen_run)


def test_initial_weights_are_rebuilt_exactly_as_training_started(frozen_run, loaded):
    started = assemble(run_config(frozen_run, {})).model.state_dict()
    rebuilt = initial_state(loaded)
    assert rebuilt.keys() == started.keys()
    assert all(torch.equal(rebuilt[k], started[k]) for k in started)
    assert not torch.equal(rebuilt["head.weight"], loaded.final["head.weight"])


def test_cka_to_the_pretrained_backbone_is_one_exactly_where_training_changed_nothing(loaded):
    scores = {r["group"]: r["cka"] for r in analyze_cka(loaded, None, 64, "flatten").table["groups"]}
    assert list(scores) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert scores["stem"] == pytest.approx(1.0, abs=1e-9)
    assert scores["layer1"] == pytest.approx(1.0, abs=1e-9)
    assert scores["head"] < 0.999  # the head trained from its random init


def test_criticality_of_frozen_groups_is_zero_with_the_real_initial_weights(loaded):
    test = take_batches(loaded, "test", 16)
    _, drops = rewind_drops(loaded, initial_state(loaded), test, take_batches(loaded, "train", 16), alphas=(0.0, 0.5))
    assert drops["stem"] == drops["layer1"] == [0.0, 0.0]


def test_spectrum_equals_svdvals_of_independently_computed_features(loaded):
    table = analyze_spectrum(loaded, "test", 40).table
    model = loaded.model
    images = []
    for batch in loaded.run.loaders["test"]:  # eval batches of 16: 40 examples = 2 batches and 8 of the third
        images.append(batch["pixel_values"])
        if sum(len(i) for i in images) >= 40:
            break
    images = torch.cat(images)[:40]
    model.eval()
    expected = {}
    for name, state in (("run", loaded.final), ("pretrained", pretrained_state(loaded))):
        model.load_state_dict(state)
        with torch.no_grad():
            expected[name] = torch.linalg.svdvals(model.features({"pixel_values": images}).double())
    model.load_state_dict(loaded.final)
    assert table["examples"] == 40
    for name in ("run", "pretrained"):
        assert torch.allclose(torch.tensor(table[f"{name}_singular_values"], dtype=torch.float64), expected[name],
                              rtol=1e-5)
    assert not torch.allclose(expected["run"], expected["pretrained"])


def test_analyze_command_writes_tables_and_plot_for_two_runs(frozen_run, capsys):
    main(["analyze", "cka", str(frozen_run), str(frozen_run), "--max-examples", "64"])
    folder = frozen_run / "analysis"
    table = json.loads((folder / f"cka_{frozen_run.name}.json").read_text())
    assert table["examples"] == 64
    assert all(r["cka"] == pytest.approx(1.0, abs=1e-9) for r in table["groups"])  # a run against itself
    assert (folder / f"cka_{frozen_run.name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| layer4 | 1.0000 |" in printed
    assert (folder / f"cka_{frozen_run.name}.md").read_text().strip() in printed


@pytest.mark.parametrize("argv,message", [
    (["analyze"], "the following arguments are required"),
    (["analyze", "cka", "/no/such/run"], "is not a run folder"),
    (["analyze", "interpolate", "RUN", "--steps", "1"], "at least 2"),
    (["analyze", "spectrum", "RUN", "--split", "val"], "invalid choice"),
    (["analyze", "cka", "RUN", "--max-examples", "0"], "positive number"),
])
def test_analyze_mistakes_get_one_line(frozen_run, capsys, argv, message):
    argv = [str(frozen_run) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
