"""SpotTune and AdaFilter: forced routes give the pretrained / fine-tuned networks, frozen copies do not
move, the decision networks learn, evaluation is deterministic, resume and `eval` are exact."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import transfer_cli
from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.routing.sites import plan_sites
from tests.test_loop import CrashingLoader
from tests.test_schedules import bert, resnet
from tests.toy import ToyLoader, ToyModel, toy_config

STRATEGIES = ["spottune", "adafilter"]
CONFIGS = Path(transfer_cli.__file__).parent / "configs" / "strategy"


def strategy_cfg(name, **overrides):
    return OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), overrides)


def make_trainer(run_dir, model, loader, name, **overrides):
    cfg = toy_config(max_epochs=overrides.pop("max_epochs", 2), resume=overrides.pop("resume", False))
    small = {"policy_width": 16} if name == "spottune" else {"hidden": 16}  # the decision net's size is not under test
    cfg.strategy = strategy_cfg(name, **{**small, **overrides})
    return Trainer(model, build_strategy(cfg), loader, loader, loader, cfg, run_dir)


def backbone(kind, tiny_bert):
    torch.manual_seed(0)
    return resnet() if kind == "resnet" else bert(tiny_bert)


def logits_of(strategy, model, batch):
    model.eval()
    with torch.no_grad():
        return strategy.forward(model, batch)


@pytest.mark.parametrize("kind", ["resnet", "bert"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_forced_routes_give_the_pretrained_and_the_fine_tuned_network(name, kind, tmp_path, tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    pretrained = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model, loader, name, shared="freeze", max_epochs=1)
    trainer.fit()
    strategy, batch = trainer.strategy, next(iter(loader))
    moved = [n for n, p in model.named_parameters() if n.startswith("body.")
             and not torch.equal(p, dict(pretrained.named_parameters())[n])]
    assert moved, "training did not move the fine-tuned blocks: the forced comparison would prove nothing"

    strategy.routing.force = 0  # every block / unit takes the frozen path
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.features(batch), pretrained.eval().features(batch), rtol=1e-5, atol=1e-5)

    strategy.routing.force = 1  # every block / unit takes the fine-tuned path
    plain = copy.deepcopy(pretrained)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("routing.")})
    torch.testing.assert_close(logits_of(strategy, model, batch), plain.eval()(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", STRATEGIES)
def test_forced_fine_tuned_training_is_plain_fine_tuning(name, tmp_path):
    torch.manual_seed(0)
    routed, plain = ToyModel(), ToyModel()
    plain.load_state_dict(routed.state_dict())
    trainer = make_trainer(tmp_path / "routed", routed, ToyLoader(), name, max_epochs=2)
    strategy, setup = trainer.strategy, trainer.strategy.setup

    def forced_setup(*args):
        setup(*args)
        strategy.routing.force = 1

    strategy.setup = forced_setup
    trainer.fit()
    cfg = toy_config(max_epochs=2)
    cfg.strategy = OmegaConf.create({"name": "finetune"})
    Trainer(plain, build_strategy(cfg), ToyLoader(), ToyLoader(), ToyLoader(), cfg, tmp_path / "plain").fit()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(routed.state_dict()[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resnet", "bert"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_frozen_copies_stay_bit_identical_and_the_decision_network_learns(name, kind, tmp_path, tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    pretrained = copy.deepcopy(model)
    trainer = make_trainer(tmp_path, model, loader, name, max_epochs=1)
    trainer.prepare()
    decider = trainer.strategy.routing.decider
    start = {n: p.detach().clone() for n, p in decider.named_parameters() if p.requires_grad}
    trainer.fit()  # prepares again: a second setup keeps the routing it built
    decider = trainer.strategy.routing.decider
    routing = trainer.strategy.routing
    for site, frozen in zip(routing.sites, routing.frozen):
        for module_name, copied in zip(site.modules, frozen):
            saved = pretrained.get_submodule(module_name).state_dict()
            assert all(torch.equal(saved[k], v) for k, v in copied.state_dict().items())
    assert any(not torch.equal(start[n], p) for n, p in decider.named_parameters() if n in start)

    model.train()
    batch = next(iter(loader))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(trainer.strategy.forward(model, batch), batch["labels"]).backward()
    no_gradient = [n for n, p in decider.named_parameters()
                   if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert no_gradient == []
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert all(0 <= r[f"finetuned/{b}"] <= 1 for r in records for b, _ in model.blocks())
    assert all("policy" in r["lr"] for r in records)


@pytest.mark.parametrize("kind", ["resnet", "bert"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_evaluation_routes_the_same_input_the_same_way(name, kind, tmp_path, tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    trainer = make_trainer(tmp_path, model, loader, name)
    trainer.prepare()
    batch = next(iter(loader))
    first, second = logits_of(trainer.strategy, model, batch), logits_of(trainer.strategy, model, batch)
    assert torch.equal(first, second)


def test_spottune_budget_penalty_counts_the_fine_tuned_blocks(tmp_path):
    model, loader = resnet()
    trainer = make_trainer(tmp_path, model, loader, "spottune", budget_k=1, budget_weight=0.5)
    trainer.prepare()
    model.train()
    batch = next(iter(loader))
    logits = trainer.strategy.forward(model, batch)
    used = trainer.strategy.routing.decider.decisions.sum(1).mean()
    penalty = trainer.strategy.penalty(model, batch, logits)["spottune_budget"]
    assert torch.allclose(penalty, 0.5 * (used - 1) ** 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_resume_after_a_crash_gives_the_uninterrupted_result(name, tmp_path):
    torch.manual_seed(0)
    model_a = ToyModel()
    a = make_trainer(tmp_path / "a", model_a, ToyLoader(), name, max_epochs=3).fit()
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(tmp_path / "b", ToyModel(), CrashingLoader(1), name, max_epochs=3).fit()
    torch.manual_seed(123)  # the resumed process starts from another RNG state
    model_b = ToyModel()
    b = make_trainer(tmp_path / "b", model_b, ToyLoader(), name, max_epochs=3, resume=True).fit()
    assert b.test == a.test
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_a_model_without_blocks_is_a_one_line_error():
    model = ToyModel()
    model._block_names = ()
    strategy = build_strategy(OmegaConf.create({"strategy": strategy_cfg("spottune"), "optim": {}}))
    with pytest.raises(TransferCliError, match="Hugging Face BERT-like"):
        strategy.setup(model, ToyLoader(), torch.device("cpu"))


@pytest.mark.slow
def test_cli_spottune_trains_and_eval_restores_the_policy(tmp_path, capsys):
    main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path}", "strategy=spottune"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert "finetuned/body.layer1.0" in read_jsonl(tmp_path / "metrics.jsonl")[-1]
    main(["eval", f"run={tmp_path}"])
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == results["test"]
    capsys.readouterr()
    main(["export", f"run={tmp_path}", f"out={tmp_path / 'body.safetensors'}"])
    assert "the exported body is the fine-tuned path alone" in capsys.readouterr().err
    assert (tmp_path / "body.safetensors").is_file()


@pytest.mark.slow
def test_cli_adafilter_with_minilm(tmp_path):
    main(["train", "experiment=minilm_sentiment", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=1",
          f"hydra.run.dir={tmp_path}", "strategy=adafilter"])
    assert json.loads((tmp_path / "results.json").read_text())["config"]["strategy"] == "adafilter"
    assert "finetuned/body.encoder.layer.5" in read_jsonl(tmp_path / "metrics.jsonl")[-1]


def test_adafilter_routes_every_convolution_of_a_cnn_block_with_its_own_batchnorm(tiny_bert):
    model, _ = resnet()
    sites = plan_sites(model, per_filter=True)
    convs = [f"{b}.{n}" for b, block in model.blocks() for n, m in block.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(site.modules[0] for site in sites) == sorted(convs)
    for site in sites:  # each convolution's output is normalised by the BatchNorm right after it
        conv, norm = (model.get_submodule(n) for n in site.modules)
        assert isinstance(norm, torch.nn.BatchNorm2d) and norm.num_features == conv.out_channels == site.out_channels
    text, _ = bert(tiny_bert)  # no convolutions: the unit is a hidden dimension of each layer's output
    assert [site.modules for site in plan_sites(text, per_filter=True)] == [(name,) for name, _ in text.blocks()]


def test_adafilter_mixes_each_filter_after_its_own_batchnorm(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    pretrained = copy.deepcopy(model).eval()
    trainer = make_trainer(tmp_path, model, ToyLoader(), "adafilter", max_epochs=2)
    trainer.fit()
    conv, norm = model.body.block[0], model.body.block[1]
    assert not torch.equal(norm.running_mean, pretrained.body.block[1].running_mean)  # the tuned path's own statistics

    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])  # filters 0 and 2 fine-tuned, 1 and 3 pretrained
    trainer.strategy.routing.decider.gate = lambda index, site_input: mask.expand(len(site_input), -1)
    batch = next(iter(ToyLoader()))
    model.eval()
    with torch.no_grad():
        routed = model.features(batch)
        stem = model.body.stem(batch["pixel_values"])
        tuned = F.batch_norm(F.conv2d(stem, conv.weight, conv.bias, padding=1), norm.running_mean, norm.running_var,
                             norm.weight, norm.bias, eps=norm.eps)
        frozen = pretrained.body.block[1](pretrained.body.block[0](stem))
        m = mask[None, :, None, None]
        expected = F.relu(m * tuned + (1 - m) * frozen).mean(dim=(2, 3))
    torch.testing.assert_close(routed, expected)


def test_spottune_policy_sees_the_image_at_the_first_block_resolution(tmp_path):
    model, loader = resnet()  # 32-px images; timm's ResNet stem reduces 4x before the first block
    trainer = make_trainer(tmp_path / "auto", model, loader, "spottune")
    trainer.prepare()
    assert trainer.strategy.routing.decider.net.downsample == 4
    model, loader = resnet()
    trainer = make_trainer(tmp_path / "full", model, loader, "spottune", policy_downsample=1)
    trainer.prepare()
    assert trainer.strategy.routing.decider.net.downsample == 1
    model, loader = resnet()
    with pytest.raises(TransferCliError, match="policy_downsample"):
        make_trainer(tmp_path / "bad", model, loader, "spottune", policy_downsample=0).prepare()
