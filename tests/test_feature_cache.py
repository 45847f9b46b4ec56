"""Feature caching: a cached run equals the uncached one, runs the frozen part once per example, and is
refused (auto) or a one-line error (true) where caching would change the results."""
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from transfer_cli.backbones import build_backbone
from transfer_cli.data import ImageArraySplit, make_loader
from transfer_cli.data.imagefolder import scan_split
from transfer_cli.engine.loop import Trainer
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.strategies import build_strategy
from tests.toy import ToyModel, toy_config

N_TRAIN, N_VAL, N_TEST, BATCH = 20, 12, 10, 8


class StemDropoutModel(ToyModel):
    """The toy model with dropout inside its stem: the frozen part is random in training."""

    def __init__(self):
        super().__init__()
        self.body.stem.append(nn.Dropout(0.5))


class InputSkipModel(ToyModel):
    """Reads the raw input again after the stem, so it cannot be run from the stem's output alone."""

    def features(self, batch):
        x = batch["pixel_values"]
        return self.body.block(self.body.stem(x)).mean(dim=(2, 3)) + x.mean(dim=(1, 2, 3)).unsqueeze(1)


def splits(size=8):
    g = torch.Generator().manual_seed(7)
    n = N_TRAIN + N_VAL + N_TEST
    images = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    labels = (images[:, 0].float().mean(dim=(1, 2)) > 127).long()
    split = ImageArraySplit(images, labels)
    cuts = (torch.arange(N_TRAIN), torch.arange(N_TRAIN, N_TRAIN + N_VAL), torch.arange(N_TRAIN + N_VAL, n))
    return [split.select(c) for c in cuts]


def loaders(model, train=None):
    train_split, val, test = splits(model.preprocessing["input_size"][-1])
    return (train or make_loader(train_split, model, BATCH, train=True, seed=0),
            make_loader(val, model, BATCH, train=False, seed=0), make_loader(test, model, BATCH, train=False, seed=0))


def count_examples(module):
    """Examples that ran through `module`, counted by a forward hook."""
    seen = [0]
    module.register_forward_hook(lambda _m, inputs, _out: seen.__setitem__(0, seen[0] + inputs[0].shape[0]))
    return seen


def fit(tmp_path, cache, strategy="freeze", model_cls=ToyModel, model=None, train=None, epochs=3, **strategy_cfg):
    torch.manual_seed(0)
    model = model or model_cls()
    cfg = toy_config(max_epochs=epochs)
    defaults = {"groups": "all"} if strategy == "freeze" else {}
    cfg.strategy = OmegaConf.create({"name": strategy, "bn": "freeze", "cache_features": cache,
                                     **defaults, **strategy_cfg})
    counted = count_examples(model.body.stem[0] if isinstance(model, ToyModel) else model.body.layer1[0].conv1)
    trainer = Trainer(model, build_strategy(cfg), *loaders(model, train), cfg, tmp_path)
    result = trainer.fit()
    metrics = [{k: r[k] for k in ("train_loss", "train_acc1", "val_loss", "val_acc1")}
               for r in read_jsonl(tmp_path / "metrics.jsonl")]
    return result, metrics, counted[0]


def assert_same_run(a, b):
    (fit_a, metrics_a, _), (fit_b, metrics_b, _) = a, b
    assert len(metrics_a) == len(metrics_b)
    for line_a, line_b in zip(metrics_a, metrics_b):
        assert line_a == pytest.approx(line_b, abs=1e-5)
    test_a, test_b = dict(fit_a.test), dict(fit_b.test)
    assert test_a.pop("confusion") == test_b.pop("confusion")
    assert test_a == pytest.approx(test_b, abs=1e-5)


def test_cached_linear_probe_equals_uncached_and_runs_the_body_once_per_example(tmp_path):
    uncached = fit(tmp_path / "off", False)
    cached = fit(tmp_path / "on", True)
    assert_same_run(cached, uncached)
    assert uncached[2] == 3 * (N_TRAIN + N_VAL) + N_TEST
    # once per example of each split (the head after a whole body needs no check); test is recomputed
    # once after the best weights are reloaded
    assert cached[2] == N_TRAIN + N_VAL + N_TEST


def test_frozen_prefix_with_cache_equals_uncached(tmp_path):
    uncached = fit(tmp_path / "off", False, groups=1)
    cached = fit(tmp_path / "on", "auto", groups=1)
    assert_same_run(cached, uncached)
    # plus the one-batch check that the model run from the cut reproduces it (whole model + prefix)
    assert cached[2] == N_TRAIN + 2 * BATCH + N_VAL + N_TEST


@pytest.mark.slow
def test_frozen_prefix_of_a_timm_resnet_with_dropout_above_it(tmp_path):
    """The layers above the cut draw dropout masks from the same random stream in both runs."""
    cfg = OmegaConf.create({"kind": "timm", "name": "test_resnet", "pretrained": False, "weights": None,
                            "image_size": 16, "drop_rate": 0.5})

    def resnet():
        torch.manual_seed(0)
        return build_backbone(cfg, num_classes=2)

    uncached = fit(tmp_path / "off", False, model=resnet(), groups=2, epochs=2)
    cached = fit(tmp_path / "on", True, model=resnet(), groups=2, epochs=2)
    assert_same_run(cached, uncached)
    assert cached[2] < uncached[2]


def test_gradual_unfreezing_caches_each_stages_frozen_prefix(tmp_path):
    # epochs 0-1: head only (the whole body cached), 2-3: block + head (stem cached), 4: everything
    uncached = fit(tmp_path / "off", False, strategy="gradual_unfreeze", unfreeze_every=2, epochs=5)
    cached = fit(tmp_path / "on", "auto", strategy="gradual_unfreeze", unfreeze_every=2, epochs=5)
    assert_same_run(cached, uncached)
    assert uncached[2] == 5 * (N_TRAIN + N_VAL) + N_TEST
    assert cached[2] == (N_TRAIN + N_VAL) + (N_TRAIN + 2 * BATCH + N_VAL) + (N_TRAIN + N_VAL) + N_TEST


def image_files(tmp_path):
    for label in ("a", "b"):
        (tmp_path / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (10, 10), (60 * i, 200 if label == "a" else 0, 0)).save(tmp_path / label / f"{i}.png")
    return scan_split(tmp_path, ["a", "b"])


@pytest.mark.parametrize("case, message", [
    ("augment", "data.augment=true"),
    ("bn", "strategy.bn=train"),
    ("dropout", "draw random numbers"),
    ("not_a_chain", "cannot run from the output of group stem"),
])
def test_auto_refuses_an_inexact_cache_and_true_says_why(tmp_path, case, message):
    options = {"model_cls": {"dropout": StemDropoutModel, "not_a_chain": InputSkipModel}.get(case, ToyModel),
               "groups": 1, "bn": "train" if case == "bn" else "freeze"}
    if case == "augment":
        options["train"] = make_loader(image_files(tmp_path / "images"), ToyModel(), 4, train=True, seed=0,
                                       augment=True)
    uncached = fit(tmp_path / "off", False, **options)
    auto = fit(tmp_path / "auto", "auto", **options)
    assert_same_run(auto, uncached)
    assert auto[2] - uncached[2] <= 3 * BATCH  # nothing cached: at most the one-batch probe ran in addition
    with pytest.raises(TransferCliError, match=message) as error:
        fit(tmp_path / "on", True, **options)
    assert "\n" not in str(error.value)


def test_required_cache_with_nothing_frozen_at_the_bottom_is_an_error(tmp_path):
    with pytest.raises(TransferCliError, match="freezes no bottom group"):
        fit(tmp_path, True, groups=["block"])


def test_bad_setting_is_a_one_line_error():
    cfg = toy_config()
    cfg.strategy = OmegaConf.create({"name": "freeze", "groups": "all", "bn": "freeze", "cache_features": "yes"})
    with pytest.raises(TransferCliError, match="cache_features='yes'; use auto"):
        build_strategy(cfg)


def test_no_graph_is_built_through_a_frozen_prefix(tmp_path):
    """Frozen layers cost no backward pass: nothing below the first trainable group requires grad."""
    model = ToyModel()
    requires_grad = {"stem": set(), "block": set()}
    for name in requires_grad:
        getattr(model.body, name).register_forward_hook(
            lambda m, _i, out, name=name: requires_grad[name].add(out.requires_grad) if m.training else None)
    fit(tmp_path, False, model=model, groups=1)
    assert requires_grad == {"stem": {False}, "block": {True}}
