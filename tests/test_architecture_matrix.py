"""A fast slice of scripts/architecture_matrix.py: cells run through the CLI, classified, tabulated."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def matrix():
    spec = importlib.util.spec_from_file_location("architecture_matrix", ROOT / "scripts" / "architecture_matrix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_strategy_config_is_in_the_matrix(matrix):
    configs = {p.stem for p in (ROOT / "transfer_cli" / "configs" / "strategy").glob("*.yaml")}
    names = matrix.strategy_names()
    assert names[0] == "finetune" and configs <= set(names) and len(names) == len(set(names))


@pytest.mark.slow
def test_a_slice_of_cells_trains_evaluates_or_refuses_in_one_line(matrix, tmp_path):
    cells = [("test_resnet", "finetune"), ("test_resnet", "l2sp"), ("test_vit", "transtailor"),
             ("distilbert", "finetune"), ("efficientnet_lite0", "freeze")]
    records = []
    for model, strategy in cells:
        workdir = tmp_path / model
        workdir.mkdir(exist_ok=True)
        records.append(matrix.run_cell(model, strategy, matrix.model_overrides(model, workdir), workdir / strategy, []))
    outcomes = {(r["model"], r["strategy"]): r for r in records}
    for cell in [("test_resnet", "finetune"), ("test_resnet", "l2sp"), ("distilbert", "finetune"),
                 ("efficientnet_lite0", "freeze")]:
        record = outcomes[cell]
        assert record["outcome"] == "ok", record
        assert 0 <= record["acc1"] <= 1 and record["ms_per_step"] > 0
    refused = outcomes[("test_vit", "transtailor")]
    assert refused["outcome"] == "refused" and "resnet" in refused["message"].lower()
    assert "\n" not in refused["message"]
    table = "\n".join(matrix.table(records, ["test_resnet", "test_vit"], ["finetune", "l2sp", "transtailor"]))
    assert "| `finetune` | ok 1.0× |" in table and "| `transtailor` |" in table and "refused" in table
