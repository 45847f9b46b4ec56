"""Parameter-efficient strategies (LoRA and its peft relatives, adapters, BitFit, prompts, SSF): the model
starts as the pretrained one, the body stays bit-identical, exactly the method's parameters train, merged
exports reproduce the trained logits, resume is exact, and every method runs from the CLI on a timm CNN,
a timm ViT and a BERT-like encoder."""
import copy
import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

import transfer_cli
from transfer_cli.backbones import build_backbone
from transfer_cli.cli import main
from transfer_cli.overrides import compose_config
from transfer_cli.run_folder import run_config
from transfer_cli.engine import distributed
from transfer_cli.engine.evaluate_run import restore_run
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.engine.results import parameter_counts
from transfer_cli.strategies import build_strategy
from transfer_cli.strategies.peft.additions import strip
from tests.test_distributed import free_port, join_group, loader as tensor_loader
from tests.test_schedules import Batches, bert, resnet
from tests.toy import ToyLoader, ToyModel, toy_config

CONFIGS = Path(transfer_cli.__file__).parent / "configs" / "strategy"
#: label -> (strategy, overrides); the labels are what the tests are parametrised by
METHODS = {
    "lora": ("lora", {}),
    "dora": ("lora", {"use_dora": True}),
    "loha": ("lora", {"method": "loha"}),
    "lokr": ("lora", {"method": "lokr"}),
    "adapter": ("adapter", {"bottleneck": 8}),
    "pfeiffer": ("adapter", {"bottleneck": 8, "placement": "pfeiffer", "train_norms": False}),
    "ssf": ("ssf", {}),
    "bitfit": ("bitfit", {}),
    "vpt": ("vpt", {}),
    "vpt_deep": ("vpt", {"deep": True, "num_tokens": 3}),
}
MERGEABLE = ["lora", "dora", "loha", "lokr", "ssf", "bitfit"]
KINDS = ["resnet", "vit", "bert"]


def vit():
    cfg = OmegaConf.create({"kind": "timm", "name": "test_vit", "pretrained": False, "weights": None, "image_size": 32,
                            "drop_rate": 0.0})
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 32, 32, generator=g), "labels": torch.randint(0, 3, (4,), generator=g)}
               for _ in range(2)]
    return build_backbone(cfg, num_classes=3), Batches(batches)


def backbone(kind, tiny_bert):
    torch.manual_seed(0)
    return {"resnet": resnet, "vit": vit}[kind]() if kind != "bert" else bert(tiny_bert)


def applies(label, kind):
    return not (METHODS[label][0] == "vpt" and kind == "resnet")


def cases(labels, kinds=KINDS):
    return [(label, kind) for label in labels for kind in kinds if applies(label, kind)]


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and much faster when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strategy_config(label, **overrides):
    name, extra = METHODS[label]
    cfg = toy_config(**overrides)
    cfg.strategy = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), extra)
    return cfg


def set_up(label, model):
    strategy = build_strategy(strategy_config(label))
    strategy.setup(model, None, torch.device("cpu"))
    return strategy


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch)


def plain_state(module):
    """A state dict in the plain backbone's names: peft's wrapped layers keep theirs under `base_layer`."""
    return {k.replace(".base_layer", ""): v for k, v in module.state_dict().items()
            if not any(tag in k for tag in ("lora_", "hada_", "lokr_"))}


def expected_trainable(label, model):
    """The method's parameters by name, written from the papers rather than read from the strategy."""
    names = [n for n, _ in model.named_parameters()]
    method = METHODS[label][0] if label not in ("loha", "lokr") else label
    rule = {"lora": lambda n: ".lora_" in n, "loha": lambda n: ".hada_" in n, "lokr": lambda n: ".lokr_" in n,
            "bitfit": lambda n: n.startswith("body.") and n.endswith(".bias")}.get(method, lambda n: n.startswith("peft."))
    return {n for n in names if rule(n) or n.startswith("head.")}


@pytest.mark.parametrize("label,kind", cases(["lora", "dora", "loha", "lokr", "adapter", "pfeiffer", "ssf", "bitfit"]))
def test_output_at_initialisation_equals_the_pretrained_models(label, kind, tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    pretrained = copy.deepcopy(model)
    set_up(label, model)
    batch = next(iter(loader))
    assert torch.equal(logits(model, batch), logits(pretrained, batch))


@pytest.mark.parametrize("label,kind", cases(["lora", "adapter", "ssf", "bitfit", "vpt", "vpt_deep"])
                         + cases(["dora", "loha", "lokr", "pfeiffer"], ["vit"]))
def test_training_keeps_the_body_bit_identical_and_trains_exactly_the_methods_parameters(label, kind, tmp_path,
                                                                                        tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    pretrained = copy.deepcopy(model)
    cfg = strategy_config(label, max_epochs=2)
    trainer = Trainer(model, build_strategy(cfg), loader, loader, loader, cfg, tmp_path)
    trainer.fit()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(label, model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for g in trainer.optimizer.param_groups for p in g["params"]} == trainable
    after, before = plain_state(model.body), pretrained.body.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    if label == "bitfit":  # the biases are the method's parameters; everything else, statistics included, is not
        assert changed and all(f"body.{k}" in trainable for k in changed)
    else:
        assert changed == set()
    if kind == "resnet":
        assert any("running_mean" in k for k in before)


def test_the_method_parameters_move_during_training(tmp_path, tiny_bert):
    for label in ("lora", "adapter", "ssf", "vpt"):
        model, loader = backbone("vit", tiny_bert)
        cfg = strategy_config(label, max_epochs=2)
        trainer = Trainer(model, build_strategy(cfg), loader, loader, loader, cfg, tmp_path / label)
        trainer.prepare()
        start = {n: p.detach().clone() for n, p in trainer.strategy.method_parameters().items()}
        trainer.fit()
        moved = [n for n, p in trainer.strategy.method_parameters().items() if not torch.equal(p, start[n])]
        assert moved, label


@pytest.mark.parametrize("label,kind", cases(MERGEABLE))
def test_the_exported_plain_backbone_gives_the_unmerged_logits(label, kind, tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    pretrained = copy.deepcopy(model)
    strategy = set_up(label, model)
    with torch.no_grad():  # stand-in for training: move every trained parameter
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    batch = next(iter(loader))
    exported = strategy.export_model(model)
    assert exported.body.state_dict().keys() == pretrained.body.state_dict().keys()  # a plain backbone
    assert (logits(model, batch) - logits(pretrained, batch)).abs().max() > 1e-3
    torch.testing.assert_close(logits(exported, batch), logits(model, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_convnext"])
@pytest.mark.parametrize("label", ["lora", "adapter", "ssf"])
def test_other_timm_families_start_pretrained_and_ssf_and_lora_fold_exactly(label, name):
    """EfficientNet: timm's BatchNormAct2d (its activation inside), depthwise convolutions; ConvNeXt: channels-first
    LayerNorm2d, a Linear MLP in its blocks."""
    torch.manual_seed(0)
    model = build_backbone(OmegaConf.create({"kind": "timm", "name": name, "pretrained": False, "weights": None,
                                             "image_size": 64, "drop_rate": 0.0}), num_classes=3)
    pretrained, batch = copy.deepcopy(model), {"pixel_values": torch.randn(2, 3, 64, 64)}
    strategy = set_up(label, model)
    assert strategy.method_parameters() and torch.equal(logits(model, batch), logits(pretrained, batch))
    with torch.no_grad():
        for p in strategy.method_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.equal(logits(model, batch), logits(pretrained, batch))  # (ConvNeXt's layer scale starts at 1e-6)
    if label != "adapter":
        torch.testing.assert_close(logits(strategy.export_model(model), batch), logits(model, batch),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label,kind", cases(["vpt", "vpt_deep", "adapter"]))
def test_with_the_prompts_or_adapters_removed_the_model_is_the_pretrained_one(label, kind, tmp_path, tiny_bert):
    model, loader = backbone(kind, tiny_bert)
    pretrained = copy.deepcopy(model)
    cfg = strategy_config(label, max_epochs=1)
    trainer = Trainer(model, build_strategy(cfg), loader, loader, loader, cfg, tmp_path)
    trainer.fit()
    batch = next(iter(loader))
    assert not torch.allclose(logits(model, batch), logits(pretrained, batch))
    removed = copy.deepcopy(model)
    strip(removed)
    removed.head.load_state_dict(pretrained.head.state_dict())
    assert torch.equal(logits(removed, batch), logits(pretrained, batch))
    assert trainer.strategy.export_model(model).body.state_dict().keys() == pretrained.body.state_dict().keys()


class Crashes(Batches):
    """Batches whose training pass dies at its second batch of epoch `epoch`, as a killed process would."""

    def __init__(self, batches, epoch):
        super().__init__(batches)
        self.crash_epoch = epoch

    def __iter__(self):
        batches = super().__iter__()
        yield next(batches)
        if self.epoch == self.crash_epoch:
            raise KeyboardInterrupt
        yield from batches


@pytest.mark.parametrize("label", ["lora", "adapter", "ssf", "bitfit", "vpt_deep"])
def test_resume_after_a_crash_gives_the_uninterrupted_result(label, tmp_path, tiny_bert):
    def trainer(run, loader, **overrides):
        model, _ = backbone("vit", tiny_bert)
        cfg = strategy_config(label, max_epochs=3, **overrides)
        cfg.optim.layer_decay, cfg.sched = 2.0, OmegaConf.create({"name": "stlr", "cut_frac": 0.3, "ratio": 8})
        return model, Trainer(model, build_strategy(cfg), loader, loader, loader, cfg, tmp_path / run)

    _, loader = vit()
    model_a, uninterrupted = trainer("a", loader)
    a = uninterrupted.fit()
    with pytest.raises(KeyboardInterrupt):
        trainer("b", Crashes(loader.batches, epoch=1))[1].fit()
    torch.manual_seed(123)  # the resumed process starts from another RNG state (setup draws new initial values)
    model_b, resumed = trainer("b", loader, resume=True)
    b = resumed.fit()
    assert b.test == a.test
    assert model_a.state_dict().keys() == model_b.state_dict().keys()
    assert all(torch.equal(x, y) for x, y in zip(model_a.state_dict().values(), model_b.state_dict().values()))


def test_new_parameters_sit_in_the_layer_group_of_the_module_they_adapt(tiny_bert):
    expected = {"lora": "body.encoder.layer.1.attention.self.query.lora_A.default.weight",
                "adapter": "peft.body_encoder_layer_1_output_dense.down.weight",
                "ssf": "peft.body_encoder_layer_1_attention_self_value.scale"}
    for label, name in expected.items():
        model, _ = backbone("bert", tiny_bert)
        strategy = build_strategy(strategy_config(label))
        strategy.layer_decay = 2.0
        strategy.setup(model, None, torch.device("cpu"))
        assert name in model.group("layer.1").parameter_names
        groups = {g["name"]: g for g in strategy.param_groups(model, 1.0)}
        # layer decay as ULMFiT: the group below the head at lr/2, one more step per group down (the toy
        # config's SGD: strategy.lr_mult=auto keeps the run's rate)
        assert strategy.cfg.lr_mult == "auto" and groups["head"]["lr"] == strategy.head_lr_mult
        assert groups["layer.1"]["lr"] == 0.5 and groups["layer.0"]["lr"] == 0.25
        params = dict(model.named_parameters())
        assert any(p is params[name] for p in groups["layer.1"]["params"])
    model, _ = backbone("bert", tiny_bert)
    set_up("vpt_deep", model)  # the input prompts belong to the embeddings, layer i's to layer i
    assert "peft.body_embeddings_word_embeddings.tokens" in model.group("embeddings").parameter_names
    assert "peft.body_encoder_layer_1.tokens" in model.group("layer.1").parameter_names


@pytest.mark.parametrize("optimizer, lr_mult, expected", [("adamw", "auto", 10.0), ("sgd", "auto", 1.0),
                                                         ("sgd", 3, 3.0), ("adamw", 1, 1.0)])
def test_peft_rates_are_lr_mult_times_the_run_s_head_included(optimizer, lr_mult, expected, tiny_bert):
    """auto: 10x with AdamW (the PEFT papers train at 10-50x fine-tuning's rate, with Adam-type optimizers), 1x
    with SGD; a number is taken as given."""
    model, _ = backbone("bert", tiny_bert)
    cfg = strategy_config("lora")
    cfg.optim.name, cfg.strategy.lr_mult = optimizer, lr_mult
    strategy = build_strategy(cfg)
    strategy.setup(model, None, torch.device("cpu"))
    groups = {g["name"]: g["lr"] for g in strategy.param_groups(model, 0.5)}
    assert groups["head"] == 0.5 * expected * strategy.head_lr_mult
    assert groups["layer.1"] == 0.5 * expected


def test_a_bad_lr_mult_is_one_line(tiny_bert):
    cfg = strategy_config("bitfit")
    cfg.strategy.lr_mult = "fast"
    with pytest.raises(TransferCliError, match="strategy.lr_mult='fast' is not a number; give one"):
        build_strategy(cfg)


def test_lora_presets_and_targets(tiny_bert):
    model, _ = backbone("vit", tiny_bert)
    set_up("lora", model)
    assert type(model.body.blocks[0].attn.qkv).__name__ == "Linear" and hasattr(model.body.blocks[0].attn.qkv, "lora_A")
    model, _ = backbone("bert", tiny_bert)
    set_up("lora", model)  # peft's preset for BERT: the paper's W_q and W_v
    adapted = {n.rsplit(".", 1)[1] for n, m in model.body.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"query", "value"}
    model, _ = backbone("resnet", tiny_bert)
    set_up("lora", model)  # every convolution inside the residual blocks, none in the stem
    adapted = [n for n, m in model.body.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(n.startswith("layer") for n in adapted)

    model, _ = backbone("vit", tiny_bert)
    cfg = strategy_config("lora")
    cfg.strategy.target_modules = r"blocks\.0\.attn\.qkv"  # a regex over the backbone's module names
    build_strategy(cfg).setup(model, None, torch.device("cpu"))
    assert [n for n, m in model.body.named_modules() if hasattr(m, "lora_A")] == ["blocks.0.attn.qkv"]

    cfg.strategy.target_modules = ["nothing_here"]
    with pytest.raises(TransferCliError, match=r"matches no module.*blocks\.\*\.attn\.qkv, blocks\.\*\.attn\.proj"):
        build_strategy(cfg).setup(backbone("vit", tiny_bert)[0], None, torch.device("cpu"))


def test_a_backbone_a_method_cannot_serve_is_one_line(tiny_bert):
    with pytest.raises(TransferCliError, match="cannot prompt a ResNet; it supports timm VisionTransformer"):
        set_up("vpt", backbone("resnet", tiny_bert)[0])
    model = ToyModel()
    model._block_names = ()
    with pytest.raises(TransferCliError, match="lists no blocks"):
        set_up("adapter", model)
    cfg = strategy_config("loha")
    cfg.strategy.use_dora = True
    with pytest.raises(TransferCliError, match="use_dora=true is DoRA"):
        build_strategy(cfg)


def test_results_report_the_trainable_share(tmp_path):
    torch.manual_seed(0)
    model = ToyModel()
    cfg = strategy_config("bitfit", max_epochs=1)
    strategy = build_strategy(cfg)
    Trainer(model, strategy, ToyLoader(), ToyLoader(), ToyLoader(), cfg, tmp_path).fit()
    counts = parameter_counts(model)
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias") and n.startswith("body."))
    head = sum(p.numel() for p in model.head.parameters())
    assert counts["trainable"] == biases + head and counts["trainable_bytes"] == 4 * (biases + head)
    assert counts["trainable_pct"] == pytest.approx(100 * (biases + head) / counts["total"])
    assert strategy.results() == {"peft": {"method": "bitfit", "parameters": biases}}


# ---- data-parallel ---------------------------------------------------------------------------------------
def train_lora_in_one_process(rank: int, world_size: int, port: int, out: str) -> None:
    join_group(rank, world_size, port)
    try:
        torch.manual_seed(0)
        cfg = strategy_config("lora", max_epochs=2)
        model = ToyModel()
        loaders = tensor_loader(24, 1, True), tensor_loader(7, 2, False), tensor_loader(11, 3, False)
        Trainer(model, build_strategy(cfg), *loaders, cfg, Path(out) / "run").fit()
        torch.save(model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_lora_trains_data_parallel_with_identical_weights_on_every_process(tmp_path):
    mp.spawn(train_lora_in_one_process, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    pretrained = ToyModel().state_dict()
    lora = [k for k in states[0] if "lora_B" in k]
    assert lora and any(states[0][k].abs().sum() > 0 for k in lora)  # it trained
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch.equal(states[0]["body.block.0.base_layer.weight"], pretrained["body.block.0.weight"])


# ---- from the command line ------------------------------------------------------------------------------
def cli_args(kind, tiny_bert, tmp_path):
    if kind == "cnn":  # the quickstart: the shipped Fashion-MNIST test_resnet on digits
        return []
    if kind == "vit":
        return ["backbone=timm", "backbone.name=test_vit", "backbone.image_size=32"]
    csv = tmp_path / "train.csv"
    rows = ["text,label"] + [f"the cat sat on the mat {i},cat" for i in range(8)] + \
        [f"a dog ran fast {i},dog" for i in range(8)]
    csv.write_text("\n".join(rows) + "\n")
    return ["backbone=hf", f"backbone.weights={tiny_bert}", "data=csv_text", f"data.train_file={csv}", "optim=adamw"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "vit", "bert"])
@pytest.mark.parametrize("name", ["lora", "adapter", "bitfit", "vpt", "ssf"])
def test_each_method_runs_from_the_cli_and_eval_reproduces_it(name, kind, tmp_path, tiny_bert, capsys):
    run = tmp_path / "run"
    args = ["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={run}", f"strategy={name}",
            *cli_args(kind, tiny_bert, tmp_path)]
    if name == "vpt" and kind == "cnn":
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and "cannot prompt a ResNet" in capsys.readouterr().err
        return
    main(args)
    results = json.loads((run / "results.json").read_text())
    assert results["peft"]["method"] == name and 0 < results["params"]["trainable_pct"] < 100
    main(["eval", f"run={run}"])
    assert json.loads((run / "eval.json").read_text())["test"] == results["test"]
    capsys.readouterr()
    main(["export", f"run={run}", f"out={run / 'exported'}"])
    assert ("the file alone does not reproduce this run" in capsys.readouterr().err) == (name in ("adapter", "vpt"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "bert"])
def test_an_exported_lora_run_is_a_plain_backbone_with_the_runs_logits(kind, tmp_path, tiny_bert):
    run, out = tmp_path / "run", tmp_path / ("body.safetensors" if kind == "cnn" else "body")
    overrides = [f"hydra.run.dir={run}", "strategy=lora", "trainer=smoke", "trainer.device=cpu",
                 *cli_args(kind, tiny_bert, tmp_path)]
    main(["train", *overrides])
    main(["export", f"run={run}", f"out={out}"])
    cfg = run_config(run, {})
    trained, _, _ = restore_run(cfg, run)
    plain = build_backbone(OmegaConf.merge(cfg.backbone, {"weights": str(out), "pretrained": True}),
                           trained.data.num_classes)
    plain.head.load_state_dict(trained.model.head.state_dict())
    batch = next(iter(trained.loaders["test"]))
    assert any(hasattr(m, "lora_A") for m in trained.model.modules())
    assert not any(hasattr(m, "lora_A") for m in plain.modules())
    torch.testing.assert_close(logits(plain, batch), trained.strategy.forward(trained.model.eval(), batch),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_analyze_runs_on_bitfit_and_refuses_a_changed_structure_in_one_line(tmp_path, capsys):
    for name in ("bitfit", "lora"):
        main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path / name}", f"strategy={name}"])
    main(["analyze", "cka", str(tmp_path / "bitfit")])
    assert (tmp_path / "bitfit" / "analysis" / "cka.json").is_file()
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["analyze", "cka", str(tmp_path / "lora")])
    assert stop.value.code == 2 and "changes the model's structure" in capsys.readouterr().err


def test_the_shipped_vit_source_model_builds_at_its_own_resolution():
    cfg = compose_config(["experiment=fmnist_fewshot_vit", "strategy=vpt"])
    model = build_backbone(cfg.backbone, num_classes=5)
    assert model.preprocessing["input_size"] == (3, 64, 64) and model.body.pretrained_cfg["architecture"] == "test_vit"
    torch.manual_seed(0)
    assert not torch.equal(model.body.pos_embed, build_backbone(OmegaConf.merge(cfg.backbone, {"weights": None}),
                                                                num_classes=5).body.pos_embed)
