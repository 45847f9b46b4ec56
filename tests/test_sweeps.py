"""Sweeps (`train -m`): a real parallel local sweep, a failing job that does not stop it, a rerun that
skips finished jobs and resumes a killed one, and the launcher configs."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.test_data import make_images
from transfer_cli.cli import main
from transfer_cli.engine.sweep import available_cpus, thread_share
from transfer_cli.errors import TransferCliError
from transfer_cli.overrides import check_overrides

# two jobs: folder `a` exists, folder `b` does not (yet)
SWEEP = ["train", "-m", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=1", "data=imagefolder",
         "data.augment=false", "data.num_workers=0", "data.root=a,b"]


def exit_code(capsys, argv: list[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    """Each job's folder by its data.root value."""
    return {OmegaConf.load(p).data.root: p.parent.parent for p in sweep_dir.glob("*/.hydra/config.yaml")}


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory) -> tuple[Path, int, str]:
    """The sweep on the local launcher, 2 jobs in parallel, run once: (its folder's parent, exit code, stderr)."""
    root = tmp_path_factory.mktemp("sweep")
    make_images(root / "a", {"cat": 6, "dog": 6})
    cwd, err = os.getcwd(), io.StringIO()
    os.chdir(root)  # data.root=a,b relative: short job folder names
    try:
        with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exit_info:
            main([*SWEEP, "hydra/launcher=local", "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={root / 'sweep'}"])
    finally:
        os.chdir(cwd)
    return root, exit_info.value.code, err.getvalue()


@pytest.mark.slow
def test_local_sweep_records_a_failed_job_then_a_rerun_runs_only_what_is_missing(first_sweep, monkeypatch, capsys):
    root, code, err = first_sweep
    monkeypatch.chdir(root)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("transfer-cli: error: 1 job(s) of the sweep failed")
    jobs = job_dirs(root / "sweep")
    assert set(jobs) == {"a", "b"}
    failed = json.loads((jobs["b"] / "failed.json").read_text())
    assert "does not exist" in failed["error"] and failed["error_type"] == "TransferCliError"
    assert not (jobs["b"] / "results.json").exists()
    done = json.loads((jobs["a"] / "results.json").read_text())
    assert done["epochs"] == 1 and not (jobs["a"] / "failed.json").exists()
    # each parallel job ran with its share of the CPU threads
    assert done["full_config"]["trainer"]["num_threads"] == max(available_cpus() // 2, 1)

    # `b` now exists: the rerun (the basic launcher here, the rule is the launcher's) skips `a` and runs `b`
    make_images(root / "b", {"cat": 6, "dog": 6})
    before = {name: (jobs["a"] / name).stat().st_mtime_ns for name in ("results.json", "metrics.jsonl")}
    main([*SWEEP, f"hydra.sweep.dir={root / 'sweep'}"])
    assert "skipped" in capsys.readouterr().out
    assert {name: (jobs["a"] / name).stat().st_mtime_ns for name in before} == before
    assert json.loads((jobs["b"] / "results.json").read_text())["epochs"] == 1
    assert not (jobs["b"] / "failed.json").exists()

    # a job killed after its last checkpoint but before results.json resumes instead of starting over
    metrics = (jobs["b"] / "metrics.jsonl").read_bytes()
    first = json.loads((jobs["b"] / "results.json").read_text())
    (jobs["b"] / "results.json").unlink()
    main([*SWEEP, f"hydra.sweep.dir={root / 'sweep'}"])
    assert (jobs["b"] / "metrics.jsonl").read_bytes() == metrics  # no epoch ran again
    assert json.loads((jobs["b"] / "results.json").read_text())["test"] == first["test"]


@pytest.mark.slow
def test_skip_done_applies_to_a_single_run_only_when_asked(first_sweep, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(first_sweep[0])
    run_dir = tmp_path / "run"
    shutil.copytree(job_dirs(first_sweep[0] / "sweep")["a"], run_dir)
    stamp = (run_dir / "results.json").stat().st_mtime_ns
    run = ["train", *SWEEP[2:-1], "data.root=a", f"hydra.run.dir={run_dir}"]
    main([*run, "trainer.skip_done=true"])
    assert "skipped" in capsys.readouterr().out
    assert (run_dir / "results.json").stat().st_mtime_ns == stamp
    code, err = exit_code(capsys, run)  # the default for a single run: a finished run is not overwritten
    assert code == 2 and "trainer.resume=true" in err
    code, err = exit_code(capsys, [*run, "trainer.skip_done=maybe"])
    assert code == 2 and "trainer.skip_done='maybe'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("launcher, cpus, expected", [
    ({"n_jobs": 2}, 8, 4), ({"n_jobs": 3}, 8, 2), ({"n_jobs": 16}, 8, 1), ({"n_jobs": -1}, 8, 1),
    ({"n_jobs": -2}, 8, 1), ({"n_jobs": -5}, 8, 2), ({"cpus_per_task": 6}, 64, 6), ({}, 8, None),
])
def test_thread_share(launcher, cpus, expected):
    assert thread_share(OmegaConf.create(launcher), cpus) == expected


def test_override_check_accepts_the_launchers_and_names_the_choices():
    check_overrides(["hydra/launcher=local", "hydra.launcher.n_jobs=3", "seed=0,1"])
    check_overrides(["hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    with pytest.raises(TransferCliError, match="unknown hydra/launcher 'nope'; choose one of: local, slurm"):
        check_overrides(["hydra/launcher=nope"])


def test_slurm_launcher_composes_from_config(capsys):
    main(["train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=90",
          "--cfg", "hydra"])
    launcher = OmegaConf.create(capsys.readouterr().out).hydra.launcher
    assert launcher._target_ == "hydra_plugins.transfer_cli_launcher.slurm_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.timeout_min) == ("gpu", 90)
    # fitted to the partition at submission (tests/test_slurm.py)
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == ("auto", "auto", "auto")
    assert launcher.array_parallelism == 16


def test_local_launcher_composes_from_config(capsys):
    main(["train", "hydra/launcher=local", "--cfg", "hydra"])
    launcher = OmegaConf.create(capsys.readouterr().out).hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert launcher.n_jobs == 2
