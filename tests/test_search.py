"""Hyperparameter search (`train -m hydra/sweeper=search`, Optuna): trials optimise the validation
objective the train app returns, the direction follows trainer.select_by, and `report` lists the trials
with the one Optuna chose."""
import json

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.config_files import CONFIG_DIR


def sweeper_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/sweeper=search", *overrides], return_hydra_config=True)
    return cfg.hydra.sweeper


@pytest.mark.parametrize("select_by, direction", [("acc1", "maximize"), ("macro_f1", "maximize"), ("loss", "minimize")])
def test_the_direction_follows_the_selected_metric(select_by, direction):
    sweeper = sweeper_config(f"trainer.select_by={select_by}")
    assert sweeper.direction == direction
    assert sweeper._target_.endswith("OptunaSweeper") and "optim.lr" in sweeper.params


@pytest.mark.slow
def test_a_four_trial_search_over_l2sp_alpha_reports_its_best_trial(tmp_path, capsys):
    sweep = tmp_path / "search"
    main(["train", "-m", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=1", "strategy=l2sp",
          "hydra/sweeper=search", "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={sweep}",
          "strategy.alpha=tag(log, interval(1e-4, 1.0))"])
    trials = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    assert len(trials) == 4
    alphas = {t["full_config"]["strategy"]["alpha"] for t in trials}
    assert len(alphas) == 4 and all(1e-4 <= a <= 1.0 for a in alphas)
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    objectives = [t["val"]["acc1"] for t in trials]
    assert best.best_value == max(objectives)  # the validation objective, not test
    capsys.readouterr()

    main(["report", str(sweep)])

    out = capsys.readouterr().out
    assert "Optuna search in" in out and "4 finished trial(s)" in out
    best_rows = [line for line in out.splitlines() if line.startswith("| **best**")]
    assert len(best_rows) == 1 and f"{best.best_params['strategy.alpha']:.4g}" in best_rows[0]
    assert "Optuna search in" in (sweep / "report.md").read_text()


def test_search_ranges_pass_the_override_check_and_bad_keys_do_not():
    from transfer_cli.errors import TransferCliError
    from transfer_cli.overrides import check_overrides

    check_overrides(["strategy=l2sp", "hydra/sweeper=search", "strategy.alpha=tag(log, interval(1e-4, 1.0))"])
    with pytest.raises(TransferCliError, match="alpah"):
        check_overrides(["strategy=l2sp", "strategy.alpah=interval(1e-4, 1.0)"])
