"""`transfer-cli predict`: files the run never saw give the probabilities the run's own model gives the
same examples, through the run's strategy; unreadable inputs are reported one line each and counted."""
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.engine.evaluate_run import restore_run
from transfer_cli.run_folder import run_config

SMOKE = ["trainer=smoke", "trainer.device=cpu"]


def train(run_dir: Path, *overrides: str) -> Path:
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", *overrides])
    return run_dir


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@torch.no_grad()
def run_probabilities(run_dir: Path, batch: dict) -> torch.Tensor:
    """Softmax of the restored run's own forward pass on an already preprocessed batch."""
    run, _, _ = restore_run(run_config(run_dir, {}), run_dir)
    run.model.eval()
    return run.strategy.forward(run.model, batch).softmax(dim=1)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    return train(tmp_path_factory.mktemp("runs") / "digits")


def test_a_folder_of_images_gets_the_runs_own_probabilities(digits_run, tmp_path, capsys):
    run, _, _ = restore_run(run_config(digits_run, {}), digits_run)
    images = run.data.test.images[:5]  # uint8 1 x 8 x 8 digits, written as the PNG files a user has
    folder = tmp_path / "inputs"
    for i, image in enumerate(images):
        sub = folder / ("nested" if i % 2 else "")  # the folder is searched recursively
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(sub / f"digit{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "predictions.csv"

    main(["predict", f"run={digits_run}", f"input={folder}", f"out={out}", "topk=3"])

    captured = capsys.readouterr()
    assert "predicted 5 input(s), 1 unreadable input(s) skipped" in captured.out
    skipped = [line for line in captured.err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    rows = {Path(r["input"]).name: r for r in read_csv(out)}
    assert sorted(rows) == [f"digit{i}.png" for i in range(5)]
    assert list(read_csv(out)[0]) == ["input", "predicted", "top1_prob", "top2", "top2_prob", "top3", "top3_prob"]
    batch = next(iter(run.loaders["test"]))
    expected = run_probabilities(digits_run, {"pixel_values": batch["pixel_values"][:5]})
    names = json.loads((digits_run / "results.json").read_text())["class_names"]
    for i in range(5):
        row = rows[f"digit{i}.png"]
        top = expected[i].topk(3)
        assert row["predicted"] == names[int(top.indices[0])]
        assert [row["top2"], row["top3"]] == [names[int(c)] for c in top.indices[1:]]
        assert float(row["top1_prob"]) == pytest.approx(float(top.values[0]), abs=1e-5)
        assert float(row["top3_prob"]) == pytest.approx(float(top.values[2]), abs=1e-5)


def test_one_image_defaults_to_the_run_folder(digits_run, tmp_path, capsys):
    image = tmp_path / "seven.png"
    Image.new("L", (8, 8), color=200).save(image)
    main(["predict", f"run={digits_run}", f"input={image}"])
    rows = read_csv(digits_run / "predictions" / "seven.csv")
    assert len(rows) == 1 and rows[0]["input"] == str(image)
    assert len([k for k in rows[0] if k.endswith("_prob")]) == 5  # topk=5 by default
    assert "predicted 1 input(s) ->" in capsys.readouterr().out


def test_inputs_that_cannot_be_predicted_are_one_line(digits_run, tmp_path, capsys):
    from tests.test_cli import fails_with

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"no image")
    table = tmp_path / "texts.csv"
    table.write_text("text\nhello\n")
    assert "cannot read" in fails_with(capsys, ["predict", f"run={digits_run}", f"input={broken}"])
    assert "image model" in fails_with(capsys, ["predict", f"run={digits_run}", f"input={table}"])
    assert "does not exist" in fails_with(capsys, ["predict", f"run={digits_run}", f"input={tmp_path / 'nope'}"])
    assert "topk" in fails_with(capsys, ["predict", f"run={digits_run}", f"input={table}", "topk=two"])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_bert) -> Path:
    folder = tmp_path_factory.mktemp("text")
    data = folder / "train.csv"
    data.write_text("\n".join(["text,label"] + [f"the cat sat on the mat {i},cat" for i in range(6)]
                              + [f"a dog ran fast {i},dog" for i in range(6)]) + "\n")
    return train(folder / "run", "backbone=hf", f"backbone.weights={tiny_bert}", "data=csv_text",
                 f"data.train_file={data}", "optim=adamw")


TEXTS = ["the cat sat", "a dog ran fast", "the mat"]


def expect_the_runs_probabilities(run_dir: Path, rows: list[dict]) -> None:
    assert [r["input"] for r in rows] == TEXTS
    assert list(rows[0]) == ["input", "predicted", "top1_prob", "top2", "top2_prob"]  # topk capped at 2 classes
    run, _, _ = restore_run(run_config(run_dir, {}), run_dir)
    tokens = run.model.preprocessing["tokenizer"](TEXTS, padding=True, truncation=True, return_tensors="pt")
    expected = run_probabilities(run_dir, dict(tokens))
    for row, probabilities in zip(rows, expected):
        assert row["predicted"] == ["cat", "dog"][int(probabilities.argmax())]
        assert float(row["top1_prob"]) == pytest.approx(float(probabilities.max()), abs=1e-5)


def test_texts_from_jsonl_through_a_tiny_bert(text_run, tmp_path, capsys):
    inputs = tmp_path / "new.jsonl"
    inputs.write_text("\n".join([json.dumps({"text": TEXTS[0]}), "{not json", json.dumps({"text": TEXTS[1]}),
                                 json.dumps({"text": ""}), json.dumps({"text": TEXTS[2]})]) + "\n")
    out = tmp_path / "texts.csv"

    main(["predict", f"run={text_run}", f"input={inputs}", f"out={out}"])

    captured = capsys.readouterr()
    assert "predicted 3 input(s), 2 unreadable input(s) skipped" in captured.out
    assert len([line for line in captured.err.splitlines() if "skipped" in line]) == 2
    expect_the_runs_probabilities(text_run, read_csv(out))


def test_texts_from_a_csv_column_named_on_the_command_line(text_run, tmp_path, capsys):
    inputs = tmp_path / "reviews.csv"
    inputs.write_text("id,review\n1,the cat sat\n2,\n3,a dog ran fast\n4,the mat\n")

    main(["predict", f"run={text_run}", f"input={inputs}", "column=review"])

    assert "predicted 3 input(s), 1 unreadable input(s) skipped" in capsys.readouterr().out
    expect_the_runs_probabilities(text_run, read_csv(text_run / "predictions" / "reviews.csv"))
