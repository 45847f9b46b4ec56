"""Layer schedules: the trainable groups per epoch are the paper's, frozen groups do not move, resume is exact."""
import json

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.backbones import build_backbone
from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from tests.conftest import WORDS
from tests.test_loop import CrashingLoader
from tests.toy import ToyLoader, ToyModel, toy_config


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


@pytest.mark.slow
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


def chain_thaw(**cfg):
    return strategy_for({"name": "chain_thaw", "epochs_per_stage": None, "patience": 1, "next_lr_mult": 0.1,
                         "bn": "freeze", **cfg})


def test_chain_thaw_ends_a_stage_on_patience_and_restores_its_best_weights():
    strategy, model = chain_thaw(), ToyModel()
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
    strategy, model = chain_thaw(epochs_per_stage=1, patience=5), ToyModel()
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
    volatile = ("epoch_time_s", "train_samples_per_s")
    assert [{k: v for k, v in r.items() if k not in volatile} for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")] == [
        {k: v for k, v in r.items() if k not in volatile} for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]


RESNET = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


@pytest.mark.slow
@pytest.mark.parametrize("strategy, expected", [
    (["strategy=gradual_unfreeze"], [["head"], ["layer4", "head"]]),
    (["strategy=sequential_unfreeze"], [["head"], RESNET[1:]]),
    (["strategy=chain_thaw", "strategy.epochs_per_stage=1"], [["head"], ["stem"]]),
])
def test_cli_runs_each_schedule(tmp_path, strategy, expected):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", *strategy])
    assert json.loads((tmp_path / "results.json").read_text())["config"]["strategy"] == strategy[0].split("=")[1]
    assert [r["trainable_groups"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == expected
