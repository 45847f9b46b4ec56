"""`transfer-cli export format=native`: the folders timm and transformers load themselves, trained head
included, giving the run's own logits to 1e-5."""
import json
from pathlib import Path

import pytest
import timm
import torch

from tests.test_predict import train
from transfer_cli.cli import main
from transfer_cli.engine.evaluate_run import restore_run
from transfer_cli.run_folder import run_config


@torch.no_grad()
def run_logits(run_dir: Path, batch: dict) -> torch.Tensor:
    run, _, _ = restore_run(run_config(run_dir, {}), run_dir)
    run.model.eval()
    return run.strategy.forward(run.model, batch), run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "timm")


def test_timm_loads_the_export_with_the_trained_head(image_run, tmp_path):
    out = tmp_path / "native"
    main(["export", f"run={image_run}", f"out={out}", "format=native"])
    images = torch.randn(4, 3, 32, 32)
    expected, run = run_logits(image_run, {"pixel_values": images})
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == list(run.data.class_names) and config["num_classes"] == 10

    by_file = timm.create_model(config["architecture"], pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10)).eval()
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        for model in (by_file, by_folder):
            assert torch.allclose(model(images), expected, atol=1e-5, rtol=0)
    assert list(by_folder.pretrained_cfg["mean"]) == list(run.model.preprocessing["mean"])


def test_transformers_loads_the_export_with_id2label(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = tmp_path / "train.csv"
    data.write_text("\n".join(["text,label"] + [f"the cat sat on the mat {i},cat" for i in range(6)]
                              + [f"a dog ran fast {i},dog" for i in range(6)]) + "\n")
    run_dir = train(tmp_path / "text", "backbone=hf", f"backbone.weights={tiny_bert}", "data=csv_text",
                    f"data.train_file={data}", "optim=adamw", "backbone.pooling=cls")
    out = tmp_path / "hf_native"
    main(["export", f"run={run_dir}", f"out={out}", "format=native"])

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = dict(tokenizer(["the cat sat", "a dog ran fast on the mat"], padding=True, return_tensors="pt"))
    expected, _ = run_logits(run_dir, batch)
    with torch.no_grad():
        logits = model(**batch).logits
    assert model.config.id2label == {0: "cat", 1: "dog"}
    assert torch.allclose(logits, expected, atol=1e-5, rtol=0)
    assert expected.abs().max() > 1e-3  # a real comparison, not of two zeros


def test_mean_pooling_is_refused_in_one_line(tmp_path, tiny_bert, capsys):
    from tests.test_cli import fails_with

    data = tmp_path / "train.csv"
    data.write_text("text,label\n" + "".join(f"cat {i},cat\ndog {i},dog\n" for i in range(4)))
    run_dir = train(tmp_path / "mean", "backbone=hf", f"backbone.weights={tiny_bert}", "data=csv_text",
                    f"data.train_file={data}", "optim=adamw", "backbone.pooling=mean", "trainer.max_epochs=1")
    out = tmp_path / "refused"
    assert "backbone.pooling=cls" in fails_with(capsys, ["export", f"run={run_dir}", f"out={out}", "format=native"])
    assert not out.exists()
