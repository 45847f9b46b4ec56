"""Layer schedules: the trainable groups per epoch are the paper's, frozen groups do not move, resume is exact."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.backbones import build_backbone
from transfer_cli.cli import main
from transfer_cli.overrides import compose_config
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from tests.conftest import WORDS
from tests.test_loop import CrashingLoader
from tests.toy import ToyLoader, ToyModel, toy_config, without_timing


class Batches:
    """Fixed batches in an order that depends only on the epoch, like ToyLoader."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(self.epoch))
        return iter([self.batches[i] for i in order])


def toy():
    return ToyModel(), ToyLoader()


def resnet():
    cfg = OmegaConf.create({"kind": "timm", "name": "test_resnet", "pretrained": False, "weights": None,
                            "image_size": 32, "drop_rate": 0.0})
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
               for _ in range(2)]
    return build_backbone(cfg, num_classes=3), Batches(batches)


def bert(folder):
    cfg = OmegaConf.create({"kind": "hf", "name": "x", "pretrained": True, "weights": str(folder), "pooling": "cls",
                            "trust_remote_code": False, "drop_rate": 0.0})
    model = build_backbone(cfg, num_classes=3)
    tokenizer = model.preprocessing["tokenizer"]
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        texts = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (5,), generator=g)) for _ in range(4)]
        batches.append({**tokenizer(texts, padding=True, return_tensors="pt"),
                        "labels": torch.randint(0, 3, (4,), generator=g)})
    return model, Batches(batches)


def group_keys(model, buffers):
    """State-dict keys of each group: its parameters, and with `buffers` its BatchNorm statistics too."""
    prefixes = {id(m): n for n, m in model.named_modules()}
    keys = {}
    for group in model.groups():
        owned = tuple(prefixes[id(m)] + "." for m in group.modules) if buffers else ()
        keys[group.name] = [k for k in model.state_dict() if k in group.parameter_names or k.startswith(owned)]
    return keys


def watch_frozen_groups(strategy, model, changed):
    """After every epoch, record the frozen groups whose state moved during it (there should be none)."""
    keys = group_keys(model, buffers=strategy.freeze_bn)
    start, end = strategy.on_epoch_start, strategy.on_epoch_end
    snapshot = {}

    def on_epoch_start(epoch, model):
        rebuild = start(epoch, model)
        snapshot.update({k: v.clone() for k, v in model.state_dict().items()})
        return rebuild

    def on_epoch_end(epoch, model, val):
        state, frozen = model.state_dict(), set(model.group_names()) - set(model.trainable_group_names())
        changed.extend((epoch, g) for g in frozen for k in keys[g] if not torch.equal(snapshot[k], state[k]))
        return end(epoch, model, val)

    strategy.on_epoch_start, strategy.on_epoch_end = on_epoch_start, on_epoch_end


def fit(run_dir, model, loader, strategy, **trainer):
    cfg = toy_config(**trainer)
    cfg.strategy = OmegaConf.create(strategy)
    built = build_strategy(cfg)
    changed = []
    watch_frozen_groups(built, model, changed)
    trainer_ = Trainer(model, built, loader, loader, loader, cfg, run_dir)
    result = trainer_.fit()
    assert changed == []
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) in trainable for g in trainer_.optimizer.param_groups for p in g["params"])
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert all(set(r["lr"]) == set(r["trainable_groups"]) for r in records)  # frozen groups: not in the optimizer
    return result, [r["trainable_groups"] for r in records]


def gradual(names, epochs):
    return [names[max(len(names) - 1 - e, 0):] for e in range(epochs)]


def sequential(names):
    return [["head"], names[1:], names[1:], names]


def chain(names):
    return [["head"], *([n] for n in names[:-1]), names]


SCHEDULES = {
    "gradual_unfreeze": ({"unfreeze_every": 1, "bn": "freeze"}, lambda names: gradual(names, len(names) + 1)),
    "sequential_unfreeze": ({"n": 1, "k": 2, "aux_lm": False, "bn": "freeze"}, sequential),
    "chain_thaw": ({"epochs_per_stage": 1, "patience": 5, "next_lr_mult": 0.1, "bn": "freeze"}, chain),
}


@pytest.mark.parametrize("backbone", ["toy", "resnet", "bert"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_trainable_groups_per_epoch_are_the_papers(name, backbone, tmp_path, tiny_bert):
    torch.manual_seed(0)
    model, loader = {"toy": toy, "resnet": resnet, "bert": lambda: bert(tiny_bert)}[backbone]()
    names = model.group_names()
    strategy_cfg, expected = SCHEDULES[name]
    _, trainable = fit(tmp_path, model, loader, {"name": name, **strategy_cfg}, max_epochs=len(expected(names)) + 1)
    if name != "chain_thaw":  # chain-thaw stops itself after its last stage
        trainable = trainable[:-1]
    assert trainable == expected(names)


def test_gradual_unfreeze_waits_unfreeze_every_epochs(tmp_path):
    torch.manual_seed(0)
    _, trainable = fit(tmp_path, *toy(), {"name": "gradual_unfreeze", "unfreeze_every": 2, "bn": "train"}, max_epochs=5)
    assert trainable == [["head"], ["head"], ["block", "head"], ["block", "head"], ["stem", "block", "head"]]


def strategy_for(cfg):
    return build_strategy(OmegaConf.merge(toy_config(), {"strategy": cfg}))


def chain_thaw(model, max_epochs=100, **cfg):
    strategy = strategy_for({"name": "chain_thaw", "epochs_per_stage": None, "patience": 1, "next_lr_mult": 0.1,
                             "bn": "freeze", **cfg})
    strategy.plan(model, max_epochs)
    return strategy


def test_chain_thaw_ends_a_stage_on_patience_and_restores_its_best_weights():
    model = ToyModel()
    strategy = chain_thaw(model)
    strategy.on_epoch_start(0, model)
    best = {k: v.clone() for k, v in model.state_dict().items()}
    assert not strategy.on_epoch_end(0, model, {"loss": 1.0})
    with torch.no_grad():
        model.head.weight.add_(1.0)
    assert not strategy.on_epoch_end(1, model, {"loss": 2.0})  # no improvement for `patience` epochs
    assert strategy.on_epoch_start(2, model)  # a new stage: rebuild the optimizer
    assert model.trainable_group_names() == ["stem"]
    assert all(torch.equal(best[k], v) for k, v in model.state_dict().items())
    assert strategy.param_groups(model, 1.0)[0]["lr"] == pytest.approx(0.1)


def test_chain_thaw_stops_training_after_its_last_stage():
    model = ToyModel()
    strategy = chain_thaw(model, epochs_per_stage=1, patience=5)
    stops = []
    for epoch in range(4):
        strategy.on_epoch_start(epoch, model)
        stops.append(strategy.on_epoch_end(epoch, model, {"loss": 1.0 / (epoch + 1)}))
    assert stops == [False, False, False, True]


@pytest.mark.parametrize("cfg, message", [
    ({"name": "sequential_unfreeze", "n": 1, "k": 3, "aux_lm": True, "bn": "freeze"}, "aux_lm=true"),
    ({"name": "gradual_unfreeze", "unfreeze_every": 0, "bn": "freeze"}, "unfreeze_every=0"),
    ({"name": "chain_thaw", "epochs_per_stage": None, "patience": 5, "next_lr_mult": 0.1, "bn": "keep"}, "bn='keep'"),
])
def test_bad_settings_are_one_line_errors(cfg, message):
    with pytest.raises(TransferCliError, match=message):
        strategy_for(cfg)


@pytest.mark.parametrize("strategy, crash_epoch", [
    ({"name": "gradual_unfreeze", "unfreeze_every": 1, "bn": "freeze"}, 2),
    ({"name": "chain_thaw", "epochs_per_stage": 3, "patience": 5, "next_lr_mult": 0.1, "bn": "freeze"}, 1),  # mid-stage
    ({"name": "chain_thaw", "epochs_per_stage": 3, "patience": 5, "next_lr_mult": 0.1, "bn": "freeze"}, 3),  # restore due
])
def test_resume_after_a_crash_mid_schedule_gives_the_uninterrupted_result(tmp_path, strategy, crash_epoch):
    torch.manual_seed(0)
    model_a, loader = toy()
    a, _ = fit(tmp_path / "a", model_a, loader, strategy, max_epochs=6)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b", ToyModel(), CrashingLoader(crash_epoch), strategy, max_epochs=6)
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    model_b = ToyModel()
    b, _ = fit(tmp_path / "b", model_b, ToyLoader(), strategy, max_epochs=6, resume=True)
    assert b.test == a.test
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))
    assert without_timing(read_jsonl(tmp_path / "a" / "metrics.jsonl")) == without_timing(
        read_jsonl(tmp_path / "b" / "metrics.jsonl"))


RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, expected, needed, completed", [
    ("gradual_unfreeze", [["head"], ["layer4", "head"]], 6, 2),
    ("sequential_unfreeze", [["head"], RESNET[1:]], 5, 1),
    ("chain_thaw", [["head"], ["stem"]], 7, 2),  # epochs_per_stage=auto: one epoch per stage at the least
])
def test_cli_runs_each_schedule_and_says_when_max_epochs_is_too_short(tmp_path, capsys, strategy, expected, needed,
                                                                       completed):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", f"strategy={strategy}"])
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("transfer-cli: note:")]
    assert len(notes) == 1 and f"needs {needed} epochs" in notes[0] and "trainer.max_epochs=2" in notes[0]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["strategy"] == strategy
    assert results["schedule"]["completed"] == completed and results["schedule"]["stages"] == needed - (
        strategy == "sequential_unfreeze") * 2
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["trainable_groups"] for r in records] == expected


def simulate(strategy, model, max_epochs):
    """The schedule's hooks over the run's epochs, validation loss falling every epoch (no early stop):
    the trainable groups of each epoch trained."""
    seen = []
    for epoch in range(max_epochs):
        strategy.on_epoch_start(epoch, model)
        seen.append(model.trainable_group_names())
        if strategy.on_epoch_end(epoch, model, {"loss": 1.0 / (epoch + 1), "acc1": 0.5}):
            break
    return seen


@pytest.mark.parametrize("experiment", [None, pytest.param("minilm_sentiment", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_schedule_completes_with_its_defaults(name, experiment):
    """`train strategy=S` as typed, on the quickstart and on MiniLM: no note, and every stage trains."""
    cfg = compose_config([f"strategy={name}", *([f"experiment={experiment}"] if experiment else [])])
    model = build_backbone(cfg.backbone, num_classes=2)
    strategy = build_strategy(cfg)
    assert strategy.plan(model, int(cfg.trainer.max_epochs)) is None
    seen = simulate(strategy, model, int(cfg.trainer.max_epochs))
    stages = strategy.stages(model)
    assert [stage for stage in stages if stage in seen] == stages
    assert strategy.results()["schedule"] == {**strategy.results()["schedule"], "completed": len(stages),
                                              "stages": len(stages)}


def test_auto_stages_split_the_epochs_and_the_last_takes_the_remainder():
    model = ToyModel()  # stages: head, stem, block, all
    strategy = chain_thaw(model, max_epochs=10, epochs_per_stage="auto", patience=5)
    assert strategy.caps == [2, 2, 2, 4]
    seen = simulate(strategy, model, 10)
    assert seen == [["head"]] * 2 + [["stem"]] * 2 + [["block"]] * 2 + [["stem", "block", "head"]] * 4
    assert strategy.results()["schedule"]["epochs_per_stage"] == [2, 2, 2, 4]


def test_uncapped_chain_thaw_says_how_many_epochs_its_stages_need_at_least():
    model = ToyModel()
    note = chain_thaw(ToyModel(), max_epochs=10, epochs_per_stage=None, patience=5).plan(model, 10)
    assert "needs 24 epochs" in note and "strategy.epochs_per_stage=auto" in note  # 4 stages x (1 + patience)
    strategy = chain_thaw(model, max_epochs=10, epochs_per_stage=None, patience=5)
    simulate(strategy, model, 10)  # the loss keeps falling: the head stage never ends
    assert strategy.results()["schedule"]["completed"] == 0
    assert strategy.results()["schedule"]["epochs_per_stage"] == [10, 0, 0, 0]


def test_chain_thaw_patience_counts_validations_only():
    model = ToyModel()
    strategy = chain_thaw(model, max_epochs=100, epochs_per_stage=None, patience=1)
    for epoch, val in enumerate([{"loss": 1.0}, None, None, {"loss": 2.0}]):
        strategy.on_epoch_start(epoch, model)
        strategy.on_epoch_end(epoch, model, val)
    assert strategy.stage == 1 and strategy.stage_epochs == [4]  # ended by the second validation, not by epoch 2
