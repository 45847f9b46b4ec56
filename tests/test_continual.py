"""Class-incremental scenarios: the seeded class order and stages, the numbers a run reports (by hand), the
methods' properties (SimpleCIL's prototypes, EWC's Fisher, LwF's loss), exact resume and CLI runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from transfer_cli.cli import main
from transfer_cli.continual import scenario as scenario_module
from transfer_cli.continual.metrics import forgetting, stage_accuracies, summarize
from transfer_cli.continual.scenario import Scenario, run_scenario
from transfer_cli.continual.split import Stage, class_order, labels_in, plan_stages, reorder
from transfer_cli.data.splits import DataBundle, TextSplit
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.overrides import compose_config
from transfer_cli.strategies.continual.cil_lwf import ContinualLwF, distillation
from transfer_cli.strategies.continual.ewc import EWC, diagonal_fisher
from transfer_cli.strategies.continual.prototypes import SimpleCIL
from transfer_cli.strategies.continual.stage_hooks import grow_head

# ---- the class order and the stages ---------------------------------------------------------


def test_the_class_order_is_icarls_for_seed_1993():
    # iCaRL's (and PILOT's) CIFAR-100 class order, numpy's RandomState(1993): its first 20 classes
    assert class_order(100, 1993)[:20] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43, 38]
    assert class_order(10, 1993) == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    assert sorted(class_order(10, 7)) == list(range(10)) and class_order(10, 7) != class_order(10, 1993)


def test_stages_b0_inc2_and_b5_inc2():
    assert plan_stages(10, 2, 2) == [Stage(k, 2 * k, 2 * k + 2) for k in range(5)]
    assert [(s.start, s.end) for s in plan_stages(10, 5, 2)] == [(0, 5), (5, 7), (7, 9), (9, 10)]
    assert plan_stages(4, 4, 1) == [Stage(0, 0, 4)]
    with pytest.raises(TransferCliError, match="scenario.init_cls=11"):
        plan_stages(10, 11, 2)


def test_reorder_renames_labels_to_their_place_in_the_order_and_stages_select_them():
    split = TextSplit(texts=tuple("abcdef"), labels=torch.tensor([0, 1, 2, 0, 1, 2]))
    bundle = reorder(DataBundle(split, split, split, ("x", "y", "z")), [2, 0, 1])
    assert bundle.class_names == ("z", "x", "y")
    assert bundle.train.labels.tolist() == [1, 2, 0, 1, 2, 0]  # class 2 ("z") is first now
    first = labels_in(bundle.train, 0, 1)
    assert first.texts == ("c", "f") and first.labels.tolist() == [0, 0]


# ---- the numbers of a run, by hand ----------------------------------------------------------

def test_stage_accuracies_per_task_and_old_new_by_hand():
    stages = plan_stages(6, 2, 2)
    labels = torch.tensor([0, 0, 1, 2, 3, 3, 4, 5])
    predictions = torch.tensor([0, 1, 1, 3, 3, 0, 4, 4])
    record = stage_accuracies(predictions, labels, stages, 2)
    # hits: 0 yes, 0 no, 1 yes | 2 no, 3 yes, 3 no | 4 yes, 5 no
    assert record["acc1"] == 4 / 8 and record["n"] == 8
    assert record["tasks"] == [2 / 3, 1 / 3, 1 / 2]
    assert record["old_acc1"] == 3 / 6 and record["new_acc1"] == 1 / 2
    assert stage_accuracies(predictions[:3], labels[:3], stages, 0)["old_acc1"] is None


def test_matrix_average_incremental_accuracy_and_forgetting_by_hand():
    records = [{"acc1": 0.9, "tasks": [0.9]},
               {"acc1": 0.7, "tasks": [0.6, 0.8]},
               {"acc1": 0.5, "tasks": [0.3, 0.7, 0.5]}]
    summary = summarize(records)
    assert summary["accuracy_matrix"] == [[0.9, None, None], [0.6, 0.8, None], [0.3, 0.7, 0.5]]
    assert summary["avg_incremental_acc1"] == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert summary["last_acc1"] == 0.5
    # task 0: best 0.9, last 0.3 -> 0.6; task 1: best 0.8, last 0.7 -> 0.1; the last task is not counted
    assert summary["forgetting"] == pytest.approx((0.6 + 0.1) / 2)
    assert forgetting([[0.9, None]]) is None


# ---- the methods ----------------------------------------------------------------------------

class Features(nn.Module):
    """A model as the stage hooks see it: features = x @ W, a linear head, batches of dicts."""

    def __init__(self, classes=2):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, classes)
        self.preprocessing = {}

    def features(self, batch):
        return self.body(batch["x"])

    def forward(self, batch):
        return self.head(self.features(batch))

    def regroup(self):
        """TransferModel re-indexes its layer groups here after the head grew; this model has none."""


def batches(x, y, size=3):
    return [{"x": x[i:i + size], "labels": y[i:i + size]} for i in range(0, len(y), size)]


def simplecil():
    return SimpleCIL(OmegaConf.create({"name": "simplecil"}), OmegaConf.create({}))


def test_simplecil_prototypes_are_class_means_and_old_ones_never_change():
    model, method = Features(), simplecil()
    x0, y0 = torch.randn(7, 3), torch.tensor([0, 1, 0, 1, 1, 0, 0])
    method.after_stage(0, model, batches(x0, y0), torch.device("cpu"))
    with torch.no_grad():
        f0 = model.body(x0)
    expected = torch.stack([f0[y0 == 0].mean(0), f0[y0 == 1].mean(0)])
    assert torch.allclose(method.prototypes, expected, atol=1e-6)
    first = method.prototypes.clone()
    with torch.no_grad():
        model.body.weight.add_(1.0)  # whatever happens to the body later, a stored prototype stays
    x1, y1 = torch.randn(4, 3), torch.tensor([2, 3, 3, 2])
    method.after_stage(1, model, batches(x1, y1), torch.device("cpu"))
    assert method.prototypes.shape == (4, 4) and torch.equal(method.prototypes[:2], first)
    with torch.no_grad():
        f1 = model.body(x1)
    assert torch.allclose(method.prototypes[3], f1[y1 == 3].mean(0), atol=1e-6)
    # cosine classifier: an example equal to a prototype is classified as that class
    logits = method.forward(model, {"x": x1[:1]})
    cosines = F.normalize(f1[:1], dim=1) @ F.normalize(method.prototypes, dim=1).T
    assert torch.allclose(logits, cosines, atol=1e-6)


def test_ewc_fisher_equals_the_hand_computed_squared_gradients():
    torch.manual_seed(0)
    model = Features()
    model.body.requires_grad_(False)
    head = model.head
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    loader = batches(x, y, size=3)
    fisher = diagonal_fisher(model, loader, torch.device("cpu"))
    # softmax regression: dCE/dW = (p - onehot)^T f / B per batch; the Fisher is the mean of its squares
    expected_w, expected_b = torch.zeros(2, 4), torch.zeros(2)
    with torch.no_grad():
        for batch in loader:
            f = model.body(batch["x"])
            error = torch.softmax(head(f), 1) - F.one_hot(batch["labels"], 2).float()
            expected_w += (error.T @ f / len(f)) ** 2
            expected_b += (error.mean(0)) ** 2
    assert set(fisher) == {"head.weight", "head.bias"}
    assert torch.allclose(fisher["head.weight"], expected_w / 2, atol=1e-7)
    assert torch.allclose(fisher["head.bias"], expected_b / 2, atol=1e-7)


def test_ewc_penalty_merges_the_fisher_and_pulls_only_the_old_rows():
    term = EWC("ewc", OmegaConf.create({"weight": 10.0, "fisher_max": 1.0}))
    model = Features()
    model.body.requires_grad_(False)
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 1, 0, 1, 0])
    term.after_stage(0, model, batches(x, y), torch.device("cpu"))
    first = {n: f.clone() for n, f in term.fisher.items()}
    anchor = {n: a.clone() for n, a in term.anchor.items()}
    assert float(term.penalty(model, {}, torch.zeros(1, 2))["ewc"].detach()) == 0.0  # at the anchor
    grow_head(model, 4)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    w = model.head.weight
    expected = 10.0 / 2 * (first["head.weight"] * (w[:2] - anchor["head.weight"]) ** 2).sum()
    assert torch.allclose(term.penalty(model, {}, torch.zeros(1, 4))["ewc"], expected)
    new = diagonal_fisher(model, batches(x, y + 2), torch.device("cpu"))
    term.after_stage(1, model, batches(x, y + 2), torch.device("cpu"))
    alpha = 2 / 4  # old classes / classes seen
    merged = new["head.weight"].clone()
    merged[:2] = alpha * first["head.weight"] + (1 - alpha) * new["head.weight"][:2]
    assert torch.allclose(term.fisher["head.weight"], merged)
    assert term.anchor["head.weight"].shape == (4, 4)


def test_lwf_loss_is_the_tempered_distillation_of_the_previous_models_old_logits():
    z, q = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, -1.0]])
    soft, log_p = torch.softmax(q / 2, 1), torch.log_softmax(z[:, :2] / 2, 1)
    assert distillation(z[:, :2], q, 2.0) == pytest.approx(float(-(soft * log_p).sum()))
    term = ContinualLwF("cil_lwf", OmegaConf.create({"weight": 3.0, "temperature": 2.0}))
    model = Features()
    term.before_stage(0, model)
    assert float(term.penalty(model, {"x": torch.randn(2, 3)}, torch.zeros(2, 2))["cil_lwf"]) == 0.0
    term.before_stage(1, model)
    previous = model.head.weight.detach().clone()
    grow_head(model, 4)
    batch = {"x": torch.randn(5, 3)}
    logits = model(batch)
    with torch.no_grad():
        old = F.linear(model.body(batch["x"]), previous, model.head.bias[:2])
    expected = 3.0 * -(torch.softmax(old / 2, 1) * torch.log_softmax(logits[:, :2] / 2, 1)).sum() / 5
    assert torch.allclose(term.penalty(model, batch, logits)["cil_lwf"], expected, atol=1e-6)


def test_grow_head_keeps_the_old_classes_rows():
    model = Features()
    before = model.head.weight.detach().clone()
    grow_head(model, 5)
    assert model.head.out_features == 5 and torch.equal(model.head.weight[:2], before)


# ---- whole runs -----------------------------------------------------------------------------

def config(tmp_path, *extra):
    """B4 Inc3 on the digits' 10 classes: stages (0-3), (4-6), (7-9); 8 training images per class, every test one."""
    return compose_config(["scenario=class_incremental", "scenario.init_cls=4", "scenario.increment=3",
                           "trainer=smoke", "trainer.device=cpu", "data.samples_per_class=8",
                           "trainer.eval_batch_size=64", "trainer.max_test_batches=null", *extra])


class Crash(Exception):
    pass


def crash_at(monkeypatch, target, name, call):
    """Raise in the `call`-th call of target.name, as a killed process would stop there."""
    original, calls = getattr(target, name), []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise Crash
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, dying)


def stage_metrics(run):
    return [[{k: v for k, v in r.items() if "time" not in k and "per_s" not in k}
             for r in map(json.loads, (run / f"stage_{k}" / "metrics.jsonl").read_text().splitlines())]
            for k in range(3) if (run / f"stage_{k}" / "metrics.jsonl").exists()]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, target, name, call", [
    ("cil_lwf", Trainer, "train_step", 8),  # stage 2 (index 1), epoch 2 (index 1), its second step
    ("ewc", scenario_module, "predict", 2),  # stage 2's test, after its Fisher was merged
    ("aper", scenario_module, "predict", 2),  # stage 2's test, after its prototypes were added
])
def test_a_scenario_killed_mid_stage_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch, strategy, target,
                                                                         name, call):
    whole = run_scenario(config(tmp_path, f"strategy={strategy}"), tmp_path / "a")
    with monkeypatch.context() as patch:
        crash_at(patch, target, name, call)
        with pytest.raises(Crash):
            run_scenario(config(tmp_path, f"strategy={strategy}"), tmp_path / "b")
    assert (tmp_path / "b" / "stage_0" / "stage.json").exists() and not (tmp_path / "b" / "stage_1" / "stage.json").exists()
    with pytest.raises(TransferCliError, match="trainer.resume=true"):
        Scenario(config(tmp_path, f"strategy={strategy}"), tmp_path / "b").run()
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    resumed = run_scenario(config(tmp_path, f"strategy={strategy}", "trainer.resume=true"), tmp_path / "b")
    strip = lambda r: [{k: v for k, v in s.items() if k != "time_s"} for s in r["continual"]["stages"]]  # noqa: E731
    assert strip(resumed) == strip(whole)
    assert resumed["continual"]["accuracy_matrix"] == whole["continual"]["accuracy_matrix"]
    assert stage_metrics(tmp_path / "b") == stage_metrics(tmp_path / "a")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["finetune", "simplecil", "aper", "ewc", "cil_lwf"])
def test_each_method_runs_a_scenario_from_the_cli(strategy, tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "scenario=class_incremental", "scenario.init_cls=4", "scenario.increment=3", "trainer=smoke",
          "trainer.device=cpu", f"strategy={strategy}", f"hydra.run.dir={run}"])
    results = json.loads((run / "results.json").read_text())
    stages = results["continual"]["stages"]
    assert [s["classes"] for s in stages] == [[0, 4], [4, 7], [7, 10]]
    assert results["test"]["acc1"] == stages[-1]["acc1"] == results["continual"]["last_acc1"]
    assert 0 <= results["continual"]["forgetting"] <= 1 and not math.isnan(results["continual"]["avg_incremental_acc1"])
    assert "3 stages: average incremental acc1" in capsys.readouterr().out
    trained = [(run / f"stage_{k}" / "metrics.jsonl").exists() for k in range(3)]
    assert trained == {"simplecil": [False] * 3, "aper": [True, False, False]}.get(strategy, [True] * 3)
    assert sorted(p.name for p in run.rglob("end.pt")) == ["end.pt"]  # only the latest stage's is kept
    if strategy == "simplecil":
        assert results["params"]["trainable"] == 0
    if strategy == "aper":  # SSF's scales and shifts and the head trained in the first stage; frozen after it
        assert results["params"]["trainable"] == 0 and results["peft"]["parameters"] > 0
        assert results["adapted"]["parameters"] > results["peft"]["parameters"]


@pytest.mark.parametrize("overrides, message", [
    (["strategy=spottune"], "strategy=spottune cannot run in scenario=class_incremental"),
    (["strategy=freeze"], "strategy.cache_features=auto keeps one fit's frozen features"),
])
def test_what_cannot_run_in_stages_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", "scenario=class_incremental", "trainer=smoke", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


# ---- the report -----------------------------------------------------------------------------

def scenario_results(cfg, curve, tasks):
    """A results.json as Scenario._results writes it, from each stage's acc1 and per-task accuracies."""
    records = [{"stage": k, "classes": [2 * k, 2 * k + 2], "acc1": a, "tasks": t, "n": 100, "loss": 1.0}
               for k, (a, t) in enumerate(zip(curve, tasks))]
    return {"config": {"strategy": cfg.strategy.name, "seed": cfg.seed}, "full_config": {},
            "continual": {"stages": records, **summarize(records)},
            "test": {"acc1": curve[-1], "loss": 1.0, "n": 100}, "best_epoch": 2, "epochs": 3,
            "params": {"total": 10, "trainable": 10}, "train_time_s": 1.0}


def test_report_gives_average_incremental_accuracy_last_and_forgetting_over_seeds(tmp_path, capsys):
    from transfer_cli.io import write_json

    runs = {("finetune", 0): ([0.9, 0.5], [[0.9], [0.1, 0.9]]), ("finetune", 1): ([0.8, 0.4], [[0.8], [0.0, 0.8]]),
            ("simplecil", 0): ([0.9, 0.8], [[0.9], [0.8, 0.8]]), ("simplecil", 1): ([0.9, 0.9], [[0.9], [0.9, 0.9]])}
    for (strategy, seed), (curve, tasks) in runs.items():
        cfg = compose_config(["scenario=class_incremental", f"strategy={strategy}", f"seed={seed}"])
        folder = tmp_path / f"{strategy}_{seed}"
        (folder / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
        write_json(folder / "results.json", scenario_results(cfg, curve, tasks))
    main(["report", str(tmp_path), "--by", "strategy.name"])
    text = (tmp_path / "report.md").read_text()
    # finetune: Ā = (0.7, 0.6), last = (0.5, 0.4), forgetting = (0.9 − 0.1, 0.8 − 0.0) = (0.8, 0.8)
    assert "| finetune | 65.0 ± 7.1 (70.0, 60.0) | 45.0 ± 7.1 (50.0, 40.0) | 80.0 ± 0.0 (80.0, 80.0) | 0, 1 |" in text
    assert "| simplecil | 87.5 ± 3.5 (85.0, 90.0) | 85.0 ± 7.1 (80.0, 90.0) | 5.0 ± 7.1 (10.0, 0.0) | 0, 1 |" in text
    assert (tmp_path / "report_continual.png").stat().st_size > 0


@pytest.mark.parametrize("overrides, message", [
    (["strategy=simplecil"], "strategy=simplecil acts between the stages"),
    (["regularizers=[ewc]"], "ewc acts between the stages of a class-incremental run; add scenario=class_incremental"),
])
def test_a_stage_method_without_a_scenario_is_refused_in_one_line(tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as stop:
        main(["train", "trainer=smoke", *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert stop.value.code == 2 and message in capsys.readouterr().err
