"""Damaged files in a run folder: a checkpoint cut short or overwritten with garbage, results.json cut in
half, a garbled metrics.jsonl or config. Each is one line naming the file and what to do, never a
traceback; `report` lists such a run as damaged and goes on with the others."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from transfer_cli.cli import main
from transfer_cli.io import read_jsonl
from tests.test_cli import SMOKE, fails_with

pytestmark = pytest.mark.slow  # every case trains smoke runs first


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory) -> Path:
    """A sweep folder with two finished smoke runs (seeds 0 and 1)."""
    sweep = tmp_path_factory.mktemp("sweep")
    for seed in (0, 1):
        main(["train", *SMOKE, f"seed={seed}", f"hydra.run.dir={sweep / f'seed{seed}'}"])
    return sweep


@pytest.fixture
def runs(finished_runs, tmp_path) -> Path:
    copy = tmp_path / "sweep"
    shutil.copytree(finished_runs, copy)
    return copy


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage", [cut_in_half, lambda p: p.write_bytes(b"\x00garbage" * 100)],
                         ids=["truncated", "garbage"])
def test_a_damaged_last_checkpoint_is_one_line_naming_it_and_the_ways_on(runs, damage, capsys):
    run_dir = runs / "seed0"
    damage(run_dir / "checkpoints" / "last.pt")
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert re.search(r"seed0/checkpoints/last.pt is damaged \((cut short, or not a torch file|.*)\); the run cannot "
                     r"continue from it, but .*best.pt \(epoch \d\) is intact", err), err
    assert f"to start over, delete {run_dir / 'checkpoints'} and run again with trainer.resume=true" in err


def test_a_checkpoint_that_is_not_a_transfer_cli_one_says_so(runs, capsys):
    import torch

    run_dir = runs / "seed0"
    torch.save({"model": {}}, run_dir / "checkpoints" / "last.pt")
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    assert "last.pt is damaged (not a transfer-cli checkpoint: it lacks optimizer, scaler, strategy, rng, " \
           "train_state)" in err


def test_a_damaged_best_checkpoint_is_one_line_in_eval(runs, capsys):
    run_dir = runs / "seed0"
    cut_in_half(run_dir / "checkpoints" / "best.pt")
    err = fails_with(capsys, ["eval", f"run={run_dir}"])
    assert "best.pt is damaged (cut short, or not a torch file" in err
    assert "the best epoch's weights are lost: start the run over" in err


def test_report_lists_damaged_runs_and_goes_on_with_the_others(runs, tmp_path, capsys):
    for seed in (2, 3, 4):
        shutil.copytree(runs / "seed1", runs / f"seed{seed}")
    cut_in_half(runs / "seed1" / "results.json")
    metrics = runs / "seed2" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text(lines[0][:20] + "\n" + "\n".join(lines[1:]) + "\n")  # a garbled line, not the last
    (runs / "seed3" / ".hydra" / "config.yaml").write_text("seed: [unclosed\n")
    torn = runs / "seed4" / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"epoch": 2, "trai')  # torn by a kill while appended: not damage
    main(["report", str(runs)])
    out = capsys.readouterr().out
    assert "2 finished run(s) of 5" in out  # seed0 and seed4
    assert re.search(r"`seed1` .*: damaged: .*seed1/results.json is damaged \(cut short: .*\); delete it and run "
                     r"again with trainer.resume=true", out)
    assert re.search(r"`seed2` .*: damaged: .*seed2/metrics.jsonl is damaged \(line 1 is not valid JSON", out)
    assert re.search(r"`seed3` .*: damaged: .*seed3/.hydra/config.yaml is damaged \(not a readable config", out)
    assert "seed4" not in out.split("Failed, damaged or unfinished runs:")[1]
    assert len(read_jsonl(torn)) == 2


def test_a_results_file_cut_in_half_is_rebuilt_by_a_resume(runs):
    run_dir = runs / "seed0"
    expected = json.loads((run_dir / "results.json").read_text())
    cut_in_half(run_dir / "results.json")
    (run_dir / "results.json").unlink()  # what the line says to do
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    rebuilt = json.loads((run_dir / "results.json").read_text())
    assert (rebuilt["test"], rebuilt["best_epoch"]) == (expected["test"], expected["best_epoch"])
