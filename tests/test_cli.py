"""The command line end to end: train, eval, list, export, and one-line errors that overwrite nothing."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from transfer_cli.cli import main
from transfer_cli.io import read_jsonl

SMOKE = ["trainer=smoke", "trainer.device=cpu"]


def train(run_dir: Path, *overrides: str) -> dict:
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", *overrides])
    return json.loads((run_dir / "results.json").read_text())


def fails_with(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    train(run_dir)
    return run_dir


def test_smoke_run_writes_the_run_folder(smoke_run):
    results = json.loads((smoke_run / "results.json").read_text())
    assert 0.0 <= results["test"]["acc1"] <= 1.0
    assert results["test"]["loss"] > 0
    assert results["config"]["strategy"] == "finetune"
    assert results["params"]["trainable"] == results["params"]["total"] > 0
    assert results["best_epoch"] in (0, 1)
    assert results["samples_per_s"] > 0
    assert (smoke_run / ".hydra" / "config.yaml").exists()
    assert (smoke_run / "checkpoints" / "last.pt").exists()
    records = read_jsonl(smoke_run / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["trainable_groups"] == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def test_eval_reproduces_the_test_numbers_of_the_run(smoke_run, capsys):
    main(["eval", f"run={smoke_run}"])
    results = json.loads((smoke_run / "results.json").read_text())
    evaluated = json.loads((smoke_run / "eval.json").read_text())
    assert evaluated["test"]["acc1"] == results["test"]["acc1"]
    assert evaluated["test"]["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)
    assert "test acc1" in capsys.readouterr().out


def test_export_makes_a_backbone_the_next_run_can_load(smoke_run, tmp_path):
    out = tmp_path / "source.safetensors"
    main(["export", f"run={smoke_run}", f"out={out}"])
    results = train(tmp_path / "next", f"backbone.weights={out}")
    assert 0.0 <= results["test"]["acc1"] <= 1.0


@pytest.mark.slow
def test_freeze_trains_only_the_head(tmp_path):
    results = train(tmp_path / "probe", "strategy=freeze")
    assert 0 < results["params"]["trainable"] < results["params"]["total"] / 10
    assert all(r["trainable_groups"] == ["head"] for r in read_jsonl(tmp_path / "probe" / "metrics.jsonl"))


def test_scratch_starts_from_random_weights(tmp_path, smoke_run):
    scratch = train(tmp_path / "scratch", "strategy=scratch")
    finetune = json.loads((smoke_run / "results.json").read_text())
    assert scratch["test"]["loss"] != finetune["test"]["loss"]


def test_a_tiny_bert_trains_on_a_csv_text_task(tmp_path, tiny_bert):
    csv = tmp_path / "train.csv"
    rows = ["text,label"] + [f"the cat sat on the mat {i},cat" for i in range(6)] + \
        [f"a dog ran fast {i},dog" for i in range(6)]
    csv.write_text("\n".join(rows) + "\n")
    results = train(tmp_path / "text", "backbone=hf", f"backbone.weights={tiny_bert}", "data=csv_text",
                    f"data.train_file={csv}", "optim=adamw")
    assert results["config"]["num_classes"] == 2
    assert 0.0 <= results["test"]["acc1"] <= 1.0


def test_list_prints_every_strategy_with_a_summary(capsys):
    main(["list", "strategies"])
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names == sorted(names) and {"finetune", "scratch", "freeze"} <= set(names)
    assert all(len(line.split(None, 1)) == 2 for line in lines)


def test_list_describes_each_strategy_by_the_class_it_runs(capsys):
    """One place for a strategy's description: its class's docstring (adafilter's once said "per output
    channel of every block" in its config while the code gated every filter of every convolution)."""
    from transfer_cli.strategies import STRATEGIES

    main(["list", "strategies"])
    described = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(described) <= set(STRATEGIES.names())
    assert all(text == STRATEGIES.summary(name) for name, text in described.items())
    assert "each filter of each convolution" in described["adafilter"]


def test_list_regularizers_names_each_term_a_strategy_can_hold(capsys):
    from transfer_cli.strategies import REGULARIZERS

    main(["list", "regularizers"])
    described = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert set(described) == set(REGULARIZERS.names()) and {"l2sp", "delta", "bss"} <= set(described)
    assert all(text == REGULARIZERS.summary(name) for name, text in described.items())


@pytest.mark.parametrize("argv, expected", [
    (["train", "strategy=sorcery"], "unknown strategy 'sorcery'; choose one of: "),
    (["train", "backbone=nope"], "unknown backbone 'nope'; choose one of: efficientnet_lite0, hf, minilm, quickstart, timm"),
    (["train", "data=nope"], "unknown data 'nope'"),
    (["train", "trainer.max_epoch=3"], "unknown config key 'trainer.max_epoch' (did you mean trainer.max_epochs?)"),
    (["train", "-m", "strategy=finetune,sorcery"], "unknown strategy 'sorcery'"),
    (["train", "trainer.max_epochs=ten"], "trainer.max_epochs='ten' must be a number (default 30)"),
    (["train", "data.augment=maybe"], "data.augment='maybe' must be true or false"),
    (["list", "gadgets"], "usage: transfer-cli list strategies|regularizers|backbones|datasets"),
    (["fly"], "unknown command 'fly'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, expected):
    assert expected in fails_with(capsys, argv)


def test_runtime_input_errors_are_one_line(capsys, tmp_path):
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={tmp_path / 'a'}", "data=imagefolder",
                              f"data.root={tmp_path / 'missing'}"])
    assert "does not exist" in err and "data.root" in err
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={tmp_path / 'b'}", "data.classes=[0,42]"])
    assert "42" in err
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={tmp_path / 'c'}", "data=csv_text"])
    assert "data=csv_text needs data.train_file; add data.train_file=... to the command" in err
    assert not (tmp_path / "a" / "results.json").exists()


def test_a_finished_run_is_not_overwritten(capsys, smoke_run):
    before = (smoke_run / "results.json").read_bytes()
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={smoke_run}"])
    assert "trainer.resume=true" in err
    assert (smoke_run / "results.json").read_bytes() == before


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_uninterrupted_results(tmp_path):
    """A real process, really killed, resumed in its folder: the same numbers as a run left alone."""
    args = ["trainer.device=cpu", "trainer.progress=false", "trainer.max_epochs=4", "trainer.batch_size=8",
            "data.samples_per_class=40", "trainer.num_threads=1"]
    command = [sys.executable, "-m", "transfer_cli", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    subprocess.run([*command, f"hydra.run.dir={tmp_path / 'whole'}"], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, f"hydra.run.dir={killed}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_jsonl(killed / "metrics.jsonl")) < 2 and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    subprocess.run([*command, f"hydra.run.dir={killed}", "trainer.resume=true"], check=True, env=env,
                   capture_output=True)

    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((killed / "results.json").read_text())
    for key in ("test", "val", "best_epoch", "epochs", "steps", "params"):
        assert resumed[key] == whole[key], key
    assert [r["train_loss"] for r in read_jsonl(killed / "metrics.jsonl")] == \
        [r["train_loss"] for r in read_jsonl(tmp_path / "whole" / "metrics.jsonl")]
