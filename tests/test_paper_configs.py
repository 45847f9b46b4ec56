"""The paper baselines (configs/experiment/paper/): each composes, builds its model and strategy offline
(no weights, no download) with the published protocol's classes, image size and hyperparameters."""
import re
from pathlib import Path

import pytest
import torch

from transfer_cli.backbones import build_backbone
from transfer_cli.config_files import CONFIG_DIR
from transfer_cli.overrides import compose_config
from transfer_cli.strategies import build_strategy

PAPER_DIR = CONFIG_DIR / "experiment" / "paper"

# per file: the target classes, input size, and the protocol's numbers (dotted config key -> value)
TLLIB = {"optim.lr": 0.001, "optim.head_lr_mult": 10.0, "optim.momentum": 0.9, "trainer.batch_size": 48,
         "backbone.name": "resnet50.tv_in1k", "sched.name": "step", "data.train_fraction": 1.0}
DELTA_REF = {"optim.lr": 0.01, "trainer.batch_size": 64, "trainer.max_epochs": 100, "sched.step_epochs": 67,
             "strategy.attention": False, "strategy.layers": ["layer4"], "strategy.alpha": 1.53e-6,
             "backbone.name": "resnet101.tv_in1k"}
PAPER = {
    "l2sp_dogs_resnet101": (120, 224, {
        "strategy.name": "l2sp", "strategy.alpha": 0.1, "strategy.beta": 0.01, "optim.lr": 0.01,
        "trainer.batch_size": 64, "trainer.max_epochs": 48, "sched.step_epochs": 27,
        "backbone.name": "resnet101.tv_in1k"}),
    "tllib_cub200_finetune_resnet50": (200, 224, {**TLLIB, "strategy.name": "finetune",
                                                  "optim.weight_decay": 0.0005, "trainer.max_epochs": 89}),
    "l2sp_cub200_resnet50": (200, 224, {**TLLIB, "strategy.name": "l2sp", "strategy.alpha": 0.1}),
    "delta_cub200_resnet50": (200, 224, {**TLLIB, "strategy.name": "delta", "strategy.alpha": 0.01,
                                         "strategy.beta": 0.01, "strategy.attention": True}),
    "bss_cub200_resnet50": (200, 224, {**TLLIB, "strategy.name": "bss", "strategy.weight": 0.001}),
    "delta_dogs_resnet50": (120, 224, {**TLLIB, "strategy.name": "delta", "trainer.max_epochs": 44}),
    "delta_cub200_resnet101": (200, 224, {**DELTA_REF, "strategy.name": "delta"}),
    "delta_caltech256_resnet101": (257, 224, {**DELTA_REF, "strategy.name": "delta", "data.samples_per_class": 30}),
    "spottune_aircraft_resnet26": (100, 72, {
        "strategy.name": "spottune", "optim.lr": 0.1, "strategy.policy_lr_mult": 0.1, "optim.weight_decay": 0.0005,
        "trainer.max_epochs": 110, "backbone.name": "resnet26"}),
    "ulmfit_imdb_bert": (2, None, {
        "strategy.name": "gradual_unfreeze", "strategy.unfreeze_every": 1, "optim.layer_decay": 2.6,
        "optim.betas": [0.7, 0.99], "sched.name": "stlr", "sched.cut_frac": 0.1, "sched.ratio": 32,
        "data.path": "stanfordnlp/imdb", "backbone.name": "bert-base-uncased"}),
}


def paper_config(name: str, tiny_bert: Path):
    # the text baseline's BERT comes from the hub; its tiny local stand-in has the same structure
    extra = [f"backbone.weights={tiny_bert}"] if name.startswith("ulmfit") else []
    return compose_config([f"experiment=paper/{name}", *extra])


def test_every_paper_file_is_checked():
    assert {p.stem for p in PAPER_DIR.glob("*.yaml")} == set(PAPER)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_file_states_the_reported_number(name):
    comments = [line for line in (PAPER_DIR / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    stated = [" ".join(comments[i:i + 2]) for i, line in enumerate(comments) if "report" in line.lower()]
    assert any(re.search(r"report.*\d ?%", text, re.IGNORECASE) for text in stated), name


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_composes_and_builds_offline(name, tiny_bert):
    classes, size, expected = PAPER[name]
    cfg = paper_config(name, tiny_bert)
    for key, value in expected.items():
        actual = cfg
        for part in key.split("."):
            actual = actual[part]
        assert (list(actual) if isinstance(value, list) else actual) == value, key
    assert cfg.backbone.pretrained is True and not cfg.name.startswith("${")

    # image models on the meta device: the real architecture and shapes, without computing a ResNet-101
    with torch.device("meta" if size else "cpu"), torch.no_grad():
        model = build_backbone(cfg.backbone, classes, pretrained=False)
        assert model.eval()(dummy_batch(size)).shape == (1, classes)
    if size is not None:
        assert tuple(model.preprocessing["input_size"]) == (3, size, size)

    strategy = build_strategy(cfg)
    if cfg.strategy.name in ("finetune", "l2sp", "bss", "gradual_unfreeze"):  # no setup pass needed for rates
        strategy.on_epoch_start(10 ** 6, model)  # gradual unfreezing: late enough that every group trains
        rates = {g["name"]: g["lr"] for g in strategy.param_groups(model, float(cfg.optim.lr))}
        assert rates["head"] == pytest.approx(cfg.optim.lr * cfg.optim.head_lr_mult)
        body = [n for n in model.group_names() if n != "head"]
        # ULMFiT: the group directly below the head at η / d, the lowest at η / d^(number of body groups)
        assert rates[body[-1]] == pytest.approx(cfg.optim.lr / cfg.optim.layer_decay)
        assert rates[body[0]] == pytest.approx(cfg.optim.lr / cfg.optim.layer_decay ** len(body))


def dummy_batch(size):
    if size is None:
        return {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.ones(1, 8, dtype=torch.long)}
    return {"pixel_values": torch.zeros(1, 3, size, size)}
