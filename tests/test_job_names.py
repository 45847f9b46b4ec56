"""Sweep job folders: flat, short, readable, named by the job's own overrides (not its position), so that
extending a sweep in the same folder runs only the new jobs; `report` still finds every job."""
import io
from contextlib import redirect_stdout
from pathlib import Path

from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.job_names import MAX_NAME, digest, job_name
from transfer_cli.reporting.report import find_runs


def test_a_path_value_becomes_its_file_name_and_a_hash():
    name = job_name(["backbone.weights=/data/models/run 7/c.safetensors", "seed=1"])
    assert "/" not in name and " " not in name
    assert name.startswith("backbone.weights=c.safetensors-") and name.endswith(",seed=1")
    assert job_name(["backbone.weights=/other/c.safetensors"]) != job_name(["backbone.weights=/data/c.safetensors"])


def test_the_name_depends_on_the_overrides_alone():
    assert job_name(["seed=1", "strategy=l2sp"]) == job_name(["strategy=l2sp", "seed=1"]) == "seed=1,strategy=l2sp"
    assert job_name(["seed=1", "trainer.device=cpu"], exclude=["trainer.device"]) == "seed=1"
    assert job_name([]) == "defaults"


def test_a_long_name_is_capped_and_stays_distinct():
    long_a = [f"data.classes=[{','.join(map(str, range(60)))}]", "seed=0"]
    long_b = [f"data.classes=[{','.join(map(str, range(61)))}]", "seed=0"]
    assert len(job_name(long_a)) <= MAX_NAME and job_name(long_a) != job_name(long_b)


def sweep(sweep_dir: Path, seeds: str, weights: Path) -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        main(["train", "-m", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=1", f"seed={seeds}",
              f"backbone.weights={weights}", f"hydra.sweep.dir={sweep_dir}"])
    return out.getvalue()


def test_extending_a_sweep_runs_only_the_new_jobs_in_flat_folders(tmp_path):
    from transfer_cli.config_files import ASSETS_DIR

    weights = ASSETS_DIR / "fmnist_test_resnet.safetensors"  # a path-valued override, as a user gives one
    sweep(tmp_path, "0,1", weights)
    out = sweep(tmp_path, "0,1,2", weights)
    assert out.count("skipped, results.json exists") == 2
    jobs = sorted(p.parent for p in tmp_path.rglob("results.json"))
    assert [j.parent for j in jobs] == [tmp_path] * 3  # flat: every job folder directly in the sweep folder
    weights_name = f"fmnist_test_resnet.safetensors-{digest(str(weights), 6)}"
    assert [j.name for j in jobs] == [f"backbone.weights={weights_name},seed={s},trainer=smoke,trainer.max_epochs=1"
                                      for s in range(3)]  # trainer.device: an excluded key
    overrides = list(OmegaConf.load(jobs[2] / ".hydra" / "overrides.yaml"))  # the full overrides stay
    assert "seed=2" in overrides and f"backbone.weights={weights}" in overrides
    assert sorted(run.config["seed"] for run in find_runs([tmp_path])) == [0, 1, 2]
