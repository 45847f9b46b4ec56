"""Experiment configs set only trainer keys the loop knows: an unknown one (a renamed key) is silently carried
along and does nothing, as `trainer.max_eval_batches` once left efficientnet_lite0_fmnist testing on all 10,000
images instead of its 1,000."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "transfer_cli" / "configs"
EXPERIMENTS = sorted((CONFIGS / "experiment").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(CONFIGS / "experiment")))
def test_experiment_sets_only_known_trainer_keys(path):
    known = set(OmegaConf.load(CONFIGS / "trainer" / "default.yaml"))
    trainer = OmegaConf.load(path).get("trainer") or {}
    assert set(trainer) <= known, f"unknown trainer keys: {sorted(set(trainer) - known)}"


def test_the_experiments_are_found():
    assert {"efficientnet_lite0_fmnist.yaml", "minilm_sentiment.yaml"} <= {p.name for p in EXPERIMENTS}
