"""scripts/bench_gpu.py in its CPU smoke configuration: both sides timed, the report and its ratio line,
and one clear line when timm's train.py is missing or is not a train.py.

timm's train.py is on no package index, so the timed timm side here is tests/timm_train_standin.py, a
file with train.py's shape (see its docstring): these tests check the harness, not timm's speed.
"""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["--device", "cpu", "--model", "test_resnet", "--image-size", "32", "--batch-size", "8", "--steps", "3"]


def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_reports_both_sides_and_the_ratio(capsys):
    standin = ROOT / "tests" / "timm_train_standin.py"
    bench().main(["--timm-train", str(standin), *SMOKE, "--repeats", "1"])
    out = capsys.readouterr().out
    assert "model test_resnet, batch 8, image 32 px, precision bf16, channels_last on, compile off" in out
    assert f"timm's train.py: {standin}" in out
    rows = re.findall(r"^\s*(timm|transfer-cli):\s+([\d.]+) images/s", out, re.M)
    rates = {name: float(value) for name, value in rows}
    assert set(rates) == {"timm", "transfer-cli"} and all(rate > 0 for rate in rates.values())
    last = out.strip().splitlines()[-1]
    ratio = float(re.fullmatch(r"ratio transfer-cli/timm = ([\d.]+)", last).group(1))
    ours, theirs = rates["transfer-cli"], rates["timm"]  # printed to 0.05, the ratio to 0.0005
    assert (ours - 0.05) / (theirs + 0.05) - 5e-4 <= ratio <= (ours + 0.05) / (theirs - 0.05) + 5e-4


@pytest.mark.parametrize("train_py, message", [
    (None, "pass timm's train.py with --timm-train PATH"),
    ("missing/train.py", "--timm-train missing/train.py: no such file"),
    ("tests/toy.py", "defines no main, create_dataset, create_loader, train_one_epoch"),
])
def test_no_usable_train_py_is_one_line(capsys, train_py, message):
    argv = SMOKE if train_py is None else ["--timm-train", str(train_py), *SMOKE]
    with pytest.raises(SystemExit) as stop:
        bench().main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bench_gpu: error: ") and message in err and err.count("\n") == 1
    assert "pytorch-image-models repository at tag v" in err
