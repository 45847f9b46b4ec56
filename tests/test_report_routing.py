"""`transfer-cli report`'s routing figure (SpotTune, AdaFilter): per table group, the fine-tuned fraction
per block at each run's best epoch averaged over seeds, and its mean over blocks per epoch; checked
against metrics.jsonl files re-read independently, on hand-built run folders."""
import copy
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from tests.test_report import curve, fake_results
from transfer_cli.cli import main
from transfer_cli.io import write_json, write_jsonl
from transfer_cli.overrides import compose_config
from transfer_cli.reporting.grouping import default_keys
from transfer_cli.reporting.plots import report_figures, routing_chart
from transfer_cli.reporting.runs import find_runs
from transfer_cli.reporting.table import build_table

# network order; metrics.jsonl stores them sorted as text, where layer10 comes before layer2
BLOCKS = ["body.layer1.0", "body.layer1.1", "body.layer2.0", "body.layer10.0"]
ROUTED = ["adafilter", "spottune"]
SEEDS = [0, 1, 2]
EPOCHS = 4
BEST = {0: 1, 1: 3, 2: -1}  # -1: never improved, the last logged epoch stands in


def make_run(root: Path, job: int, strategy: str, seed: int) -> None:
    """A finished run folder; routed strategies log distinct, seeded fractions per block and epoch."""
    cfg = copy.deepcopy(compose_config([f"strategy={strategy}"]))
    cfg.seed = seed
    folder = root / f"{job}_seed={seed},strategy={strategy}"
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    records = curve(0.5 + 0.01 * seed, EPOCHS)
    if strategy in ROUTED:
        rng = np.random.default_rng([ROUTED.index(strategy), seed])
        for record in records:
            record.update({f"finetuned/{b}": float(v) for b, v in zip(BLOCKS, rng.uniform(size=len(BLOCKS)))})
    write_jsonl(folder / "metrics.jsonl", records)
    write_json(folder / "results.json", fake_results(cfg, 0.5 + 0.01 * seed, BEST[seed], 10.0))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("routing") / "sweep"
    jobs = [(strategy, seed) for strategy in [*ROUTED, "finetune"] for seed in SEEDS]
    for job, (strategy, seed) in enumerate(jobs):
        make_run(root, job, strategy, seed)
    return root


def expected_at_best(root: Path, strategy: str) -> np.ndarray:
    """(seeds, blocks): each seed's fractions at its best epoch, re-read from the files."""
    rows = []
    for results_file in sorted(root.glob(f"*strategy={strategy}/results.json")):
        best = json.loads(results_file.read_text())["best_epoch"]
        records = [json.loads(line) for line in (results_file.parent / "metrics.jsonl").read_text().splitlines()]
        record = next((r for r in records if r["epoch"] == best), records[-1])
        rows.append([record[f"finetuned/{b}"] for b in BLOCKS])
    assert len(rows) == len(SEEDS)
    return np.array(rows)


def expected_per_epoch(root: Path, strategy: str) -> np.ndarray:
    """(epochs,): the fraction averaged over blocks, then over seeds."""
    per_run = [[np.mean([json.loads(line)[f"finetuned/{b}"] for b in BLOCKS])
                for line in (folder / "metrics.jsonl").read_text().splitlines()]
               for folder in root.glob(f"*strategy={strategy}")]
    return np.mean(per_run, axis=0)


def test_routing_figure_plots_the_seed_mean_at_the_best_epoch(sweep):
    runs = find_runs([sweep])
    keys, _ = default_keys(runs)
    assert keys == ["strategy.name"]
    by_block, by_epoch = routing_chart(runs, keys).axes
    assert [t.get_text() for t in by_block.get_xticklabels()] == BLOCKS
    series = {c.get_label(): c for c in by_block.containers}
    assert sorted(series) == ROUTED  # finetune logged no routing
    assert by_block.get_legend().get_title().get_text() == "strategy"
    for strategy in ROUTED:
        at_best = expected_at_best(sweep, strategy)
        data_line, _, (bars,) = series[strategy].lines
        offsets = np.asarray(data_line.get_xdata()) - np.arange(len(BLOCKS))  # dodged a little per group
        assert np.ptp(offsets) == pytest.approx(0) and abs(offsets[0]) < 0.2
        assert list(data_line.get_ydata()) == pytest.approx(list(at_best.mean(axis=0)), abs=1e-12)
        half_lengths = [(seg[1][1] - seg[0][1]) / 2 for seg in bars.get_segments()]
        assert half_lengths == pytest.approx(list(at_best.std(axis=0, ddof=1)), abs=1e-12)  # std over seeds

        means = [line for line in by_epoch.get_lines() if line.get_label() == strategy]
        assert len(means) == 1 and list(means[0].get_xdata()) == list(range(EPOCHS))
        assert list(means[0].get_ydata()) == pytest.approx(list(expected_per_epoch(sweep, strategy)), abs=1e-12)
    assert len(by_epoch.get_lines()) == len(ROUTED) * (len(SEEDS) + 1)  # a thin line per run, a mean per group
    assert by_block.get_ylim() == by_epoch.get_ylim() and by_block.get_ylim()[0] < 0 < 1 < by_block.get_ylim()[1]


def test_report_writes_the_routing_png_only_when_a_run_logged_routing(sweep, tmp_path, capsys):
    main(["report", str(sweep), "--out", str(tmp_path / "all")])
    assert "report_routing.png" in capsys.readouterr().out
    with Image.open(tmp_path / "all" / "report_routing.png") as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 200

    plain = find_runs([sweep])
    plain = [r for r in plain if r.config["strategy.name"] == "finetune"]
    assert routing_chart(plain, []) is None
    assert set(report_figures(plain, build_table(plain, []), [], "test.acc1")) == {"bars", "curves"}
    main(["report", *(str(r.folder) for r in plain), "--out", str(tmp_path / "plain")])
    assert "report_routing" not in capsys.readouterr().out
    assert not (tmp_path / "plain" / "report_routing.png").exists()
    assert (tmp_path / "plain" / "report_bars.png").exists()
