"""Sweeps on a real SLURM cluster: the one-node, CPU-only cluster of scripts/slurm_cluster.py.

The tests marked `cluster` need it up: `python scripts/slurm_cluster.py start` (root, after
`apt-get install -y slurm-wlm munge`); .ci/run starts it before the tests and stops it after. When
it is not up they fail, with one line saying how to start it, because a SLURM test that skipped
itself quietly is how the launcher's defaults came to be unusable on a CPU-only partition without
any test noticing. Where SLURM cannot run at all (no root, a laptop), TRANSFER_CLI_NO_SLURM=1 skips
them; .ci/run never sets it. The request fitting and signal-delay rules are also tested without a
cluster, on sinfo output.
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from transfer_cli.cli import main
from transfer_cli.engine.slurm_resources import (Nodes, Partition, fit_request, fit_signal_delay, gpu_count, minutes,
                                                 parse_sinfo, read_partitions)
from transfer_cli.engine.sweep import thread_share
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.py"
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.status_every_s=5"]


@pytest.fixture(scope="module")
def slurm_conf() -> str:
    """The test cluster's slurm.conf; fails in one line when the cluster is not up."""
    if os.environ.get("TRANSFER_CLI_NO_SLURM") == "1":
        pytest.skip("TRANSFER_CLI_NO_SLURM=1: the SLURM tests are off")
    status = subprocess.run([sys.executable, str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True)
    if status.returncode:
        pytest.fail(f"the SLURM test cluster is not up: start it with `python {CLUSTER_SCRIPT.relative_to(ROOT)} start` "
                    "(root; apt-get install -y slurm-wlm munge), or set TRANSFER_CLI_NO_SLURM=1 to skip these tests",
                    pytrace=False)
    return status.stdout.strip().rsplit("SLURM_CONF=", 1)[1]


@pytest.fixture
def cluster(slurm_conf, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", slurm_conf)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # the jobs import this checkout's code
    monkeypatch.chdir(ROOT)


def slurm(*command: str) -> str:
    return subprocess.run(list(command), capture_output=True, text=True, check=True).stdout


def job_state(job_id: str) -> dict:
    """scontrol's fields of a finished job (they stay known to the controller for MinJobAge); a job
    that has delivered its result may take a moment to exit."""
    deadline = time.monotonic() + 120
    while True:
        fields = dict(re.findall(r"(\w+)=(\S*)", slurm("scontrol", "show", "job", job_id)))
        if fields["JobState"] not in ("RUNNING", "COMPLETING") or time.monotonic() > deadline:
            return fields
        time.sleep(1)


def job_folders(sweep_dir: Path) -> dict[str, Path]:
    """A sweep's job folders by job number (hydra.job.num, the array task): folders are named by their
    overrides, not by position."""
    from omegaconf import OmegaConf

    return {str(OmegaConf.load(p / ".hydra" / "hydra.yaml").hydra.job.num): p
            for p in sweep_dir.iterdir() if (p / ".hydra" / "hydra.yaml").is_file()}


def array_of(sweep_dir: Path) -> str:
    (submitted,) = {p.name.split("_")[0] for p in (sweep_dir / ".submitit").iterdir() if p.name[0].isdigit()}
    return submitted


def sweep(args: list[str], capsys) -> tuple[int, str]:
    """Run `train -m ...` in this process; (exit status, stderr)."""
    try:
        main(["train", "-m", *args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


# ---- without a cluster: sinfo's output and the rules -------------------------------------------
SINFO = "cpu*|64|257000|(null)|2-00:00:00\ngpu|32|500000|gpu:a100:4(S:0-1)|4:00:00\ngpu|16|128000|gpu:2|4:00:00\n"


def test_sinfo_is_read_per_partition():
    parts = parse_sinfo(SINFO)
    assert parts["cpu"] == Partition("cpu", True, (Nodes(64, 250, 0),), 2 * 24 * 60)
    assert parts["gpu"].nodes == (Nodes(32, 488, 4), Nodes(16, 125, 2)) and parts["gpu"].max_minutes == 240
    assert (gpu_count("gpu:4,shard:8"), gpu_count("(null)"), gpu_count("gpu:v100:2(S:0),gpu:t4:1")) == (4, 0, 3)
    assert (minutes("30:00"), minutes("1:30:00"), minutes("infinite"), minutes("1-00:00:30")) == (30, 90, None, 1441)


AUTO = {"partition": None, "gpus_per_node": "auto", "cpus_per_task": "auto", "mem_gb": "auto", "timeout_min": 240}


def test_auto_fits_a_cpu_partition_and_a_gpu_one():
    parts = parse_sinfo(SINFO)
    fitted, partition = fit_request(AUTO, parts)
    assert partition.name == "cpu"
    assert (fitted["gpus_per_node"], fitted["cpus_per_task"], fitted["mem_gb"]) == (None, 8, 31)  # 250 GB * 8/64
    fitted, _ = fit_request({**AUTO, "partition": "gpu"}, parts)
    assert (fitted["gpus_per_node"], fitted["cpus_per_task"], fitted["mem_gb"]) == (1, 8, 32)
    small = parse_sinfo("tiny*|2|4000|(null)|infinite\n")
    fitted, _ = fit_request(AUTO, small)
    assert (fitted["gpus_per_node"], fitted["cpus_per_task"], fitted["mem_gb"]) == (None, 2, 3)


@pytest.mark.parametrize("asked, message", [
    ({"gpus_per_node": 1}, r"hydra.launcher.gpus_per_node=1, but partition 'cpu' has no node with that "
                           r"\(64 CPUs, 250 GB, no GPU\): .* set hydra.launcher.gpus_per_node=0 to run on CPUs"),
    ({"cpus_per_task": 96}, "cpus_per_task=96, but .* ask for hydra.launcher.cpus_per_task=64 or fewer"),
    ({"mem_gb": 300}, "mem_gb=300, but .* ask for hydra.launcher.mem_gb=250 or less"),
    ({"partition": "gpu", "gpus_per_node": 4, "cpus_per_task": 48},  # only the 32-CPU nodes have 4 GPUs
     r"cpus_per_task=48, but partition 'gpu' .* ask for hydra.launcher.cpus_per_task=32 or fewer"),
    ({"partition": "gpu", "timeout_min": 600}, "timeout_min=600 is above the time limit of partition 'gpu', 240 min"),
    ({"partition": "big"}, "hydra.launcher.partition='big' is not a partition of this cluster; choose one of: cpu, gpu"),
])
def test_a_request_the_partition_cannot_meet_is_one_line(asked, message):
    with pytest.raises(TransferCliError, match=message) as refused:
        fit_request({**AUTO, **asked}, parse_sinfo(SINFO))
    assert "\n" not in str(refused.value)


def test_a_signal_delay_near_the_limit_is_corrected():
    assert fit_signal_delay(240, 120) == (120, None)
    delay, note = fit_signal_delay(2, 120)
    assert delay == 10 and note.startswith("hydra.launcher.signal_delay_s=120 is not well below timeout_min=2 (120 s)")
    assert fit_signal_delay(10, 600)[0] == 240  # half of 600 s, less SLURM's 60 s of slack
    assert "\n" not in note


def test_a_slurm_job_takes_the_cpus_slurm_gave_it(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert thread_share({"cpus_per_task": "auto"}, 64) == 3


# ---- on the cluster ------------------------------------------------------------------------------
def test_the_partition_is_read_and_auto_fits_this_machine(cluster):
    parts = read_partitions()
    node = slurm("slurmd", "-C").split()
    cpus = int(next(f for f in node if f.startswith("CPUs=")).split("=")[1])
    assert list(parts) == ["cpu"] and parts["cpu"].default and parts["cpu"].nodes[0].gpus == 0
    fitted, _ = fit_request(AUTO, parts)
    assert (fitted["gpus_per_node"], fitted["cpus_per_task"]) == (None, min(8, cpus))


def test_gpus_on_the_cpu_partition_are_refused_before_anything_is_submitted(cluster, tmp_path, capsys):
    before = slurm("squeue", "-h", "-t", "all")
    code, err = sweep([*LAUNCHER, "trainer=smoke", "hydra.launcher.gpus_per_node=1", f"hydra.sweep.dir={tmp_path}"],
                      capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith("transfer-cli: error: hydra.launcher.gpus_per_node=1, but partition 'cpu' has no node")
    assert slurm("squeue", "-h", "-t", "all") == before


@pytest.mark.slow
def test_a_sweep_runs_on_slurm_its_failures_end_failed_and_report_reads_it(cluster, tmp_path, capsys):
    """Four jobs, two at a time (1 CPU each on a 2-CPU node: the others wait, and the sweep says why);
    two of them fail: FAILED in SLURM, failed.json, the sweep goes on and exits 2."""
    code, err = sweep([*LAUNCHER, "hydra.launcher.cpus_per_task=1", "trainer=smoke", "trainer.device=cpu",
                       "trainer.select_by=acc1,bogus", "seed=0,1", f"hydra.sweep.dir={tmp_path}"], capsys)
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("transfer-cli: error: 2 job(s) of the sweep failed")
    assert re.search(r"transfer-cli: waiting for \d of 4 SLURM jobs \(job \d+\): .*pending \((Resources|Priority)", err)
    assert err.count("Bypassing sacct error") <= 1 and err.count("job accounting is not available") <= 1
    array = array_of(tmp_path)
    folders = job_folders(tmp_path)
    for task in "01":
        assert json.loads((folders[task] / "results.json").read_text())["epochs"] == 2
        assert job_state(f"{array}_{task}")["JobState"] == "COMPLETED"
    for task in "23":
        assert "trainer.select_by='bogus'" in json.loads((folders[task] / "failed.json").read_text())["error"]
        assert job_state(f"{array}_{task}")["JobState"] == "FAILED"  # what sacct and dashboards show

    main(["report", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 finished run(s) of 4" in out and re.search(r"\| acc1 \| \d+\.\d ± \d+\.\d \| 2 \| 0 \|", out)
    assert re.search(r"\| bogus \| - \| 0 \| 2 \|", out)


@pytest.mark.slow
def test_a_job_killed_without_a_result_gets_a_failed_json(cluster, tmp_path, capsys):
    swept = threading.Event()

    def cancel_once_running():  # as an administrator or the out-of-memory killer would
        while not swept.is_set():
            submitted = [p for p in tmp_path.glob(".submitit/*") if p.name[0].isdigit()]
            if submitted:
                running = slurm("squeue", "-h", "-t", "running", "-j", array_of(tmp_path), "-o", "%i").split()
                if running:
                    subprocess.run(["scancel", *running], check=False)
                    return
            time.sleep(0.5)
    canceller = threading.Thread(target=cancel_once_running)
    canceller.start()
    try:
        code, err = sweep([*LAUNCHER, "hydra.launcher.cpus_per_task=1", "trainer=smoke", "trainer.max_epochs=100000",
                           f"hydra.sweep.dir={tmp_path}"], capsys)
    finally:
        swept.set()
        canceller.join()
    assert code == 2
    (failed,) = tmp_path.glob("*/failed.json")
    error = json.loads(failed.read_text())["error"]
    assert re.search(r"SLURM job \d+_?\d* ended \(CANCELLED\) without a result; its log: ", error)


REQUEUED_RUN = ["trainer.device=cpu", "trainer.num_threads=1", "data.samples_per_class=80", "seed=0"]
# the run must outlast a job's first attempt: with timeout_min=2 and signal_delay_s=10 SLURM signals at most
# 110 s after the start
TRAIN_FOR_S = 140


def epochs_for(seconds: float, folder: Path) -> int:
    """How many epochs of REQUEUED_RUN take about `seconds` on this machine now: a short run measures it."""
    main(["train", *REQUEUED_RUN, "trainer.max_epochs=3", f"hydra.run.dir={folder}"])
    per_epoch = max(r["epoch_time_s"] for r in read_jsonl(folder / "metrics.jsonl")) * 1.2  # and its validation
    return max(10, round(seconds / per_epoch))


@pytest.mark.slow
def test_a_job_that_hits_its_time_limit_is_requeued_and_ends_with_the_uninterrupted_numbers(cluster, tmp_path, capsys):
    """timeout_min=2 with the default signal_delay_s=120 (corrected to 10 s): SLURM signals the job 10-70 s
    before its limit, submitit requeues it, and it resumes from checkpoints/last.pt. The run is sized to
    this machine's speed to take longer than one attempt, so it is requeued at least once."""
    epochs = epochs_for(TRAIN_FOR_S, tmp_path / "calibration")
    run = [*REQUEUED_RUN, f"trainer.max_epochs={epochs}"]
    reference = subprocess.Popen([sys.executable, "-m", "transfer_cli", "train", *run,
                                  f"hydra.run.dir={tmp_path / 'reference'}"], stdout=subprocess.DEVNULL)
    code, err = sweep([*LAUNCHER, "hydra.launcher.status_every_s=30", "hydra.launcher.cpus_per_task=1",
                       "hydra.launcher.timeout_min=2", "hydra.launcher.max_num_timeout=8", *run,
                       f"hydra.sweep.dir={tmp_path / 'sweep'}"], capsys)
    assert reference.wait(timeout=900) == 0
    assert code == 0, err[-3000:]
    assert "hydra.launcher.signal_delay_s=120 is not well below timeout_min=2 (120 s)" in err
    assert "using signal_delay_s=10" in err
    assert int(job_state(array_of(tmp_path / "sweep"))["Restarts"]) >= 1  # it was requeued
    (run_dir,) = job_folders(tmp_path / "sweep").values()
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())
    resumed = json.loads((run_dir / "results.json").read_text())
    assert (resumed["test"], resumed["best_epoch"]) == (expected["test"], expected["best_epoch"])

    def curve(folder: Path) -> list:
        return [(r["epoch"], r["train_loss"], r["val_loss"], r["val_acc1"]) for r in read_jsonl(folder / "metrics.jsonl")]
    assert [epoch for epoch, *_ in curve(run_dir)] == list(range(epochs))  # contiguous: every epoch once
    assert curve(run_dir) == curve(tmp_path / "reference")
