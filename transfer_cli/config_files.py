"""The YAML configs shipped in the package: where they live, what each group offers, and the
`${asset:NAME}` resolver they use for files shipped beside them (transfer_cli/assets/).

Anything that composes a config or reads a run's saved one imports this module, so the resolver is
registered before an interpolation needs it.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from transfer_cli.job_names import job_name

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ASSETS_DIR = Path(__file__).resolve().parent / "assets"

OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS_DIR / name), replace=True)
# hydra.sweep.subdir: a sweep job's folder named by its own overrides (job_names.py)
OmegaConf.register_new_resolver("job_name", lambda overrides, exclude: job_name(overrides, exclude), replace=True)
# hydra/sweeper=optuna: the train app returns the validation trainer.select_by; only loss is lower-better
OmegaConf.register_new_resolver("objective_direction", lambda select_by: "minimize" if select_by == "loss" else "maximize",
                                replace=True)


def config_options(group: str) -> list[str]:
    """The config names of a group (`strategy`, `backbone`, ...): what `group=NAME` accepts."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def config_summary(group: str, name: str) -> str:
    """A config file's first comment line: the one-line description `list` prints."""
    for line in (CONFIG_DIR / group / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""
