"""Two commands on a fresh machine: README opens with `make quickstart` and `make test`, the Makefile
builds the virtual environment they need on first use, and CI (.ci/run) runs the same test command."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make TARGET` would run with a virtual environment folder that does not exist yet."""
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(ROOT), target, f"VENV={venv}"],
                          capture_output=True, text=True,
                          check=True)
    return done.stdout.splitlines()


def test_readme_opens_with_the_two_commands():
    first_block = re.search(r"```\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.split("#")[0].strip()]
    assert commands == ["make quickstart", "make test"]


def test_make_creates_the_environment_first_then_runs(tmp_path):
    venv = tmp_path / "fresh"
    for target, last in (("quickstart", f"{venv}/bin/transfer-cli train"), ("test", f"{venv}/bin/python -m pytest -q")):
        commands = dry_run(target, venv)
        assert commands[0] == f"python3 -m venv {venv}"
        torch = next(i for i, c in enumerate(commands) if "pip install -q torch==2.14.1 torchvision==0.29.1" in c)
        package = next(i for i, c in enumerate(commands) if 'pip install -q -e ".[dev]"' in c)
        assert torch < package < len(commands) - 1
        assert commands[-1] == last


def test_ci_runs_the_readme_test_command_around_its_slurm_cluster():
    script = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
              if line.strip() and not line.strip().startswith("#")]
    assert script[-1] == "make test"
    assert any("slurm-wlm" in line for line in script) and any("munge" in line for line in script)
    assert script.index(".venv/bin/python scripts/slurm_cluster.py start") < len(script) - 1
