"""`transfer-cli report`: the table's numbers against the results.json files, grouping by the keys that
vary, --by / --metric, failed and unfinished jobs, the CSV, the plots; on a hand-built sweep with
known numbers and on a real tiny sweep."""
import copy
import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.engine.sweep import record_failure
from transfer_cli.errors import TransferCliError
from transfer_cli.io import write_json, write_jsonl
from transfer_cli.overrides import compose_config
from transfer_cli.reporting.grouping import default_keys
from transfer_cli.reporting.plots import bar_chart, learning_curves, report_figures, samples_chart
from transfer_cli.reporting.render import markdown
from transfer_cli.reporting.runs import find_runs, flatten
from transfer_cli.reporting.table import build_table

STRATEGIES = ["finetune", "scratch", "l2sp"]
SAMPLES = [5, 10, 20]  # sorted as text this would be 10, 20, 5
SEEDS = [0, 1, 2]
FAILED = ("scratch", 20, 2)  # this job raised: failed.json
UNFINISHED = ("l2sp", 5, 2)  # this job was killed: config and a partial metrics.jsonl only
BASE = {"finetune": 0.6, "scratch": 0.3, "l2sp": 0.55}


def fake_results(cfg, acc1: float, best_epoch: int, train_time: float) -> dict:
    """A results.json with the structure transfer_cli.engine.results.build_results writes."""
    return {
        "config": {"strategy": cfg.strategy.name, "backbone": cfg.backbone.name, "data": cfg.data.name,
                   "seed": cfg.seed, "samples_per_class": cfg.data.samples_per_class, "num_classes": 10},
        "full_config": OmegaConf.to_container(cfg, resolve=True),
        "test": {"acc1": acc1, "loss": 2.0 - acc1, "n": 539},
        "val": {"acc1": acc1 - 0.05, "loss": 2.1 - acc1},
        "best_epoch": best_epoch, "epochs": 6, "steps": 12,
        "params": {"total": 373658, "trainable": 373658},
        "train_time_s": train_time, "samples_per_s": 100.0, "device": "cpu", "precision": "fp32",
        "versions": {"python": "3.11", "transfer_cli": "0.1.0", "torch": "2", "timm": "1", "transformers": "5"},
    }


def curve(acc1: float, epochs: int) -> list[dict]:
    return [{"epoch": e, "val_acc1": acc1 * (e + 1) / epochs, "val_loss": 1.0, "train_loss": 1.0,
             "best": True, "step": 2 * (e + 1)} for e in range(epochs)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A 3 strategies × 3 samples-per-class × 3 seeds multirun folder with known, distinct numbers."""
    root = tmp_path_factory.mktemp("multirun") / "2026-11-23" / "12-00-00"
    job = 0
    for strategy in STRATEGIES:
        composed = compose_config([f"strategy={strategy}"])
        for samples in SAMPLES:
            for seed in SEEDS:
                cfg = copy.deepcopy(composed)
                cfg.seed, cfg.data.samples_per_class = seed, samples
                folder = root / f"{job}_data.samples_per_class={samples},seed={seed},strategy={strategy}"
                job += 1
                (folder / ".hydra").mkdir(parents=True)
                OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")  # unresolved, as Hydra writes it
                acc1 = BASE[strategy] + 0.01 * samples + 0.03 * seed ** 2  # seed spread differs per group size
                if (strategy, samples, seed) == FAILED:
                    record_failure(folder, RuntimeError("CUDA out of memory\nsecond line"))
                elif (strategy, samples, seed) == UNFINISHED:
                    write_jsonl(folder / "metrics.jsonl", curve(acc1, 6)[:2])
                else:
                    write_json(folder / "results.json", fake_results(cfg, acc1, seed + samples // 5, 10.0 + seed))
                    write_jsonl(folder / "metrics.jsonl", curve(acc1, 6))
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


@pytest.fixture(scope="module")
def runs(sweep) -> list:
    return find_runs([sweep])


def expected_groups(root: Path, metric=("test", "acc1"), by=("data.samples_per_class", "strategy.name")) -> dict:
    """Re-read the run folders independently of the report code: {group values: list of metric values}."""
    groups: dict[tuple, list[float]] = {}
    for results_file in root.rglob("results.json"):
        cfg = OmegaConf.load(results_file.parent / ".hydra" / "config.yaml")
        results = json.loads(results_file.read_text())
        values = tuple(OmegaConf.select(cfg, k) for k in by)
        groups.setdefault(values, []).append(results[metric[0]][metric[1]])
    return groups


# ---- grouping and the numbers ----------------------------------------------------------------
def test_default_grouping_is_the_keys_that_vary_except_seed_and_keys_fixed_by_others(runs):
    assert len(runs) == 27
    assert [r.status for r in runs].count("done") == 25 and [r.status for r in runs].count("failed") == 1
    keys, follow = default_keys(runs)
    assert keys == ["data.samples_per_class", "strategy.name"]
    assert "seed" not in keys + follow and "name" not in keys + follow  # ignored outright
    assert "strategy.alpha" in follow  # exists only for l2sp: fixed by strategy.name


def test_table_numbers_match_the_results_files(runs, sweep):
    table = build_table(runs, ["data.samples_per_class", "strategy.name"])
    expected = expected_groups(sweep)
    assert [g.values for g in table] == [(k, s) for k in SAMPLES for s in sorted(STRATEGIES)]
    for group in table:
        values = expected[group.values]
        assert group.n == len(values)
        assert group.mean == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert group.std == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert group.failed == (group.values == FAILED[1::-1])
        assert group.unfinished == (group.values == UNFINISHED[1::-1])
        assert sorted(group.seeds) == [s for s in SEEDS if (group.values[1], group.values[0], s) not in
                                       (FAILED, UNFINISHED)]
    finetune5 = next(g for g in table if g.values == (5, "finetune"))
    assert finetune5.best_epochs == [1, 2, 3] and finetune5.train_times == [10.0, 11.0, 12.0]


def test_markdown_shows_accuracy_in_percent_with_counts(runs, sweep):
    keys = ["data.samples_per_class", "strategy.name"]
    text = markdown(build_table(runs, keys, "test.acc1"), keys, "test.acc1")
    values = expected_groups(sweep)[(20, "scratch")]  # two seeds left: the failed one is counted apart
    mean, std = 100 * statistics.fmean(values), 100 * statistics.stdev(values)
    row = next(line for line in text.splitlines() if line.startswith("| 20 | scratch |"))
    # the fakes predate trainable_pct: the share comes from their counts (trainable = total here)
    assert row == f"| 20 | scratch | {mean:.1f} ± {std:.1f} | 2 | 1 | 0 | 4.5 | 10.5 | 373,658 | 100 |"
    assert text.splitlines()[0].startswith("| data.samples_per_class | strategy.name | test.acc1 (%) | n |")


def test_report_command_writes_markdown_csv_and_plots(sweep, tmp_path, capsys):
    main(["report", str(sweep), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (tmp_path / "report.md").read_text().strip() in printed
    assert "25 finished run(s) of 27" in printed
    failed = next(line for line in printed.splitlines() if "CUDA out of memory" in line)  # failed.json's message
    assert failed.startswith("- `17_data.samples_per_class=20,seed=2,strategy=scratch` ")  # relative to DIR
    assert "failed:" in failed and "(data.samples_per_class=20, strategy.name=scratch, seed=2)" in failed
    assert "unfinished: no results.json" in printed

    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    expected = expected_groups(sweep)
    assert [(int(r["data.samples_per_class"]), r["strategy.name"]) for r in rows] == sorted(
        expected, key=lambda k: (k[0], k[1]))
    for row in rows:
        values = expected[(int(row["data.samples_per_class"]), row["strategy.name"])]
        assert float(row["test.acc1_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert float(row["test.acc1_std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
        assert int(row["n"]) == len(values)
        assert int(row["params_trainable"]) == 373658
    scratch20 = next(r for r in rows if r["strategy.name"] == "scratch" and r["data.samples_per_class"] == "20")
    assert (scratch20["failed"], scratch20["unfinished"], scratch20["seeds"]) == ("1", "0", "0 1")

    for name in ("bars", "samples", "curves"):
        with Image.open(tmp_path / f"report_{name}.png") as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200
    assert not (sweep / "report.md").exists()  # --out, not the first DIR


def test_by_pools_the_other_keys_and_metric_picks_any_number(sweep, tmp_path, capsys):
    main(["report", str(sweep), "--by", "strategy.name", "--metric", "val.acc1", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Pooled within each row (varying, not grouped on): data.samples_per_class" in printed
    rows = {r["strategy.name"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert set(rows) == set(STRATEGIES)
    pooled = expected_groups(sweep, ("val", "acc1"), ("strategy.name",))
    for strategy, values in pooled.items():
        assert int(rows[strategy[0]]["n"]) == len(values) == (9 if strategy[0] == "finetune" else 8)
        assert float(rows[strategy[0]]["val.acc1_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-12)
    assert rows["scratch"]["failed"] == "1" and rows["l2sp"]["unfinished"] == "1"


def test_trainable_share_column_from_results_or_from_older_results_counts(tmp_path):
    """trainable % is results.json's params.trainable_pct, averaged over a group's seeds; a results.json written
    before that field existed gives it from its counts, and one without a total shows "-" (no row is lost)."""
    cfg = compose_config(["strategy=lora"])
    params = {"lora": [{"total": 1000, "trainable": 7, "trainable_pct": 0.7},
                       {"total": 1000, "trainable": 9, "trainable_pct": 0.9}],
              "bitfit": [{"total": 4000, "trainable": 100}],  # older: counts only
              "finetune": [{"trainable": 500}]}  # oldest: no total
    for strategy, records in params.items():
        for seed, record in enumerate(records):
            folder = tmp_path / f"seed={seed},strategy={strategy}"
            (folder / ".hydra").mkdir(parents=True)
            run_cfg = copy.deepcopy(cfg)
            run_cfg.strategy.name, run_cfg.seed = strategy, seed
            OmegaConf.save(run_cfg, folder / ".hydra" / "config.yaml")
            results = fake_results(run_cfg, 0.5 + 0.1 * seed, 1, 1.0)
            write_json(folder / "results.json", {**results, "params": record})
    main(["report", str(tmp_path), "--by", "strategy.name", "--out", str(tmp_path)])
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[0].endswith("| trainable params | trainable % |")
    shares = {line.split(" | ")[0].strip("| "): line.rsplit(" | ", 1)[-1].strip(" |") for line in lines[2:5]}
    assert shares == {"bitfit": "2.5", "finetune": "-", "lora": "0.8"}
    rows = {r["strategy.name"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert float(rows["lora"]["params_trainable_pct"]) == pytest.approx(0.8)
    assert float(rows["bitfit"]["params_trainable_pct"]) == pytest.approx(2.5)
    assert rows["finetune"]["params_trainable_pct"] == ""


def test_by_a_constant_key_gives_one_row_per_value(runs):
    table = build_table(runs, ["optim.lr"], "best_epoch")
    assert len(table) == 1 and table[0].n == 25 and table[0].failed == 1 and table[0].unfinished == 1


# ---- errors ----------------------------------------------------------------------------------
def fails_with(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_unknown_by_key_names_the_keys_that_exist(sweep, capsys):
    err = fails_with(capsys, ["report", str(sweep), "--by", "strategy"])
    assert "unknown --by key 'strategy'" in err and "did you mean strategy.name?" in err
    assert "data.samples_per_class, strategy.name" in err


def test_unknown_metric_lists_the_numbers_of_results_json(sweep, capsys):
    err = fails_with(capsys, ["report", str(sweep), "--metric", "test.accuracy"])
    assert "'test.accuracy' is not a number in results.json" in err
    assert "test.acc1" in err and "train_time_s" in err and "full_config" not in err


def test_a_folder_without_runs_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "no runs under" in fails_with(capsys, ["report", str(tmp_path / "empty")])
    assert "is not a folder" in fails_with(capsys, ["report", str(tmp_path / "missing")])


def test_only_failed_runs_is_an_error_not_an_empty_table(sweep, tmp_path):
    folder = tmp_path / "0_seed=0"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text((next(sweep.rglob("config.yaml"))).read_text())
    record_failure(folder, ValueError("bad"))
    runs = find_runs([tmp_path])
    assert runs[0].status == "failed" and "bad" in runs[0].error
    with pytest.raises(TransferCliError, match="none of the 1 run"):
        main(["report", str(tmp_path), "--verbose"])


# ---- plots -----------------------------------------------------------------------------------
def test_bar_chart_has_one_bar_per_group_with_std_error_bars(runs):
    keys = ["data.samples_per_class", "strategy.name"]
    table = build_table(runs, keys)
    ax = bar_chart(table, keys, "test.acc1").axes[0]
    bars = [container for container in ax.containers if hasattr(container, "patches")]
    assert len(bars) == 3  # one series per samples-per-class value, grouped by strategy
    assert [t.get_text() for t in ax.get_xticklabels()] == sorted(STRATEGIES)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["5", "10", "20"]
    heights = sorted(p.get_height() for c in bars for p in c.patches)
    assert heights == pytest.approx(sorted(100 * g.mean for g in table))
    assert ax.get_ylabel() == "test.acc1 (%)" and ax.get_xlabel() == "strategy" and ax.get_title()
    caps = [c for c in ax.containers if not hasattr(c, "patches")]
    assert len(caps) == 3  # error bar containers, one per series


def test_samples_chart_has_one_line_per_strategy(runs):
    keys = ["data.samples_per_class", "strategy.name"]
    table = build_table(runs, keys)
    ax = samples_chart(table, keys, "test.acc1").axes[0]
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == sorted(STRATEGIES)
    finetune = lines[sorted(STRATEGIES).index("finetune")]
    assert list(finetune.get_xdata()) == SAMPLES
    assert list(finetune.get_ydata()) == pytest.approx(
        [100 * g.mean for g in table if g.values[1] == "finetune"])
    assert len(ax.collections) == 3  # the std bands
    assert "samples per class" in ax.get_xlabel()


def test_learning_curves_one_panel_per_samples_value_runs_and_means(runs):
    fig = learning_curves(runs, ["data.samples_per_class", "strategy.name"])
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == [f"data.samples_per_class={k}" for k in SAMPLES]
    for ax, samples in zip(axes, SAMPLES):
        done = [r for r in runs if r.status == "done" and r.config["data.samples_per_class"] == samples]
        assert len(ax.get_lines()) == len(done) + len(STRATEGIES)  # a thin line per run, a mean per strategy
        assert [t.get_text() for t in ax.get_legend().get_texts()] == sorted(STRATEGIES)
    finetune_mean = [line for line in axes[0].get_lines() if line.get_label() == "finetune"][0]
    expected = np.mean([[100 * r["val_acc1"] for r in run.curve] for run in runs if run.status == "done"
                        and run.config["strategy.name"] == "finetune" and run.config["data.samples_per_class"] == 5],
                       axis=0)
    assert list(finetune_mean.get_ydata()) == pytest.approx(list(expected))


def test_samples_plot_only_when_samples_per_class_varies(runs):
    runs = [r for r in runs if r.config["data.samples_per_class"] == 10]
    keys, _ = default_keys(runs)
    assert keys == ["strategy.name"]
    assert set(report_figures(runs, build_table(runs, keys), keys, "test.acc1")) == {"bars", "curves"}


# ---- a real sweep ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_sweep(tmp_path_factory) -> Path:
    """A one-job multirun (one job keeps the suite fast): the real folder layout and file formats."""
    folder = tmp_path_factory.mktemp("real") / "sweep"
    main(["train", "-m", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=1", "seed=0",
          f"hydra.sweep.dir={folder}"])
    return folder


def test_report_of_a_real_sweep(real_sweep, capsys):
    capsys.readouterr()
    main(["report", str(real_sweep)])
    printed = capsys.readouterr().out.splitlines()
    (results_file,) = real_sweep.rglob("results.json")
    results = json.loads(results_file.read_text())
    assert printed[0].startswith("| test.acc1 (%) | n | failed |")  # nothing varies: one row, no key columns
    assert printed[2] == (f"| {100 * results['test']['acc1']:.1f} | 1 | 0 | 0 | {results['best_epoch']:.1f} | "
                          f"{results['train_time_s']:.1f} | {results['params']['trainable']:,} | "
                          f"{results['params']['trainable_pct']:.3g} |")
    assert {p.name for p in real_sweep.glob("report*")} == {"report.md", "report.csv", "report_bars.png",
                                                            "report_curves.png"}
    (row,) = csv.DictReader((real_sweep / "report.csv").open())
    assert float(row["test.acc1_mean"]) == results["test"]["acc1"] and row["test.acc1_std"] == ""
    assert float(row["params_trainable_pct"]) == results["params"]["trainable_pct"]


def test_fake_runs_have_the_real_structure(real_sweep, sweep):
    """Every field of the hand-built results.json exists, with the same kind of value, in a real one
    (results.json may gain fields; the fakes need not follow)."""
    real = json.loads(next(real_sweep.rglob("results.json")).read_text())
    fake = json.loads(next(sweep.rglob("results.json")).read_text())

    def shape(tree: dict) -> dict:
        return {k: type(v).__name__ for k, v in flatten({k: v for k, v in tree.items() if k != "full_config"}).items()}

    assert shape(fake).items() <= shape(real).items()
    assert shape(fake).keys() >= {"test.acc1", "best_epoch", "train_time_s", "params.trainable"}
    real_curve = json.loads((next(real_sweep.rglob("metrics.jsonl"))).read_text().splitlines()[0])
    assert {"epoch", "val_acc1"} <= set(real_curve)


def test_several_folders_pool_into_a_report_of_their_own(sweep, tmp_path, monkeypatch, capsys):
    """`report A B` once wrote the pooled table over A's own report.md without saying so."""
    first, second = sorted(p for p in sweep.iterdir() if (p / "results.json").exists())[:2]
    monkeypatch.chdir(tmp_path)
    main(["report", str(first), str(second)])
    printed = capsys.readouterr().out
    written = list((tmp_path / "reports").glob("pooled-*/report.md"))
    assert len(written) == 1 and str(written[0].relative_to(tmp_path)) in printed
    assert "2 finished run(s) of 2" in written[0].read_text()
    assert not (first / "report.md").exists() and not (second / "report.md").exists()
    main(["report", str(first), str(second)])  # the same folders: the same report folder
    assert list((tmp_path / "reports").glob("pooled-*/report.md")) == written
