"""Reading run folders for the report: every folder holding `.hydra/config.yaml` is a run, done
(results.json), failed (failed.json, written by a sweep job that raised), unfinished (neither:
still running, or killed) or damaged (a file that cannot be read back: results.json cut short, a
garbled metrics.jsonl; the report names it and goes on with the others). The config is flattened to
dotted keys so runs can be compared key by key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from transfer_cli.errors import TransferCliError
from transfer_cli.io import DamagedFile
from transfer_cli.run_folder import RunFolder, find_run_folders, read_config

#: results.json's `weights` section joins a done run's config keys under this prefix
WEIGHTS_PREFIX = "weights."


@dataclass
class Run:
    """One run folder: its flattened config and whatever it left behind."""

    folder: Path
    config: dict[str, Any]
    results: Optional[dict] = None
    error: Optional[str] = None  # failed.json's message
    curve: list[dict] = field(default_factory=list)  # metrics.jsonl, one record per epoch
    damaged: Optional[str] = None  # the one line naming the damaged file and what to do

    @property
    def status(self) -> str:
        if self.damaged is not None:
            return "damaged"
        if self.results is not None:
            return "done"
        return "failed" if self.error is not None else "unfinished"


def find_runs(folders: Sequence[Path]) -> list[Run]:
    """Every run under the folders (recursively), each once, in path order."""
    run_dirs: dict[Path, None] = {}
    for folder in folders:
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise TransferCliError(f"{folder} is not a folder; give a run folder or a sweep folder (multirun/...)")
        found = find_run_folders(folder)
        if not found:
            raise TransferCliError(f"no runs under {folder}: no .hydra/config.yaml there; give the folder of a "
                                   "`transfer-cli train` run or of a `train -m` sweep")
        run_dirs.update((d.resolve(), None) for d in found)
    return [load_run(d) for d in run_dirs]


def load_run(folder: Path) -> Run:
    """The run in `folder`; a file in it that cannot be read makes it a damaged run, not an error."""
    files = RunFolder(folder)
    try:
        config = load_config(files.config_file)
    except DamagedFile as damaged:
        return Run(folder, {}, damaged=str(damaged))
    try:
        results, error = files.read_results(), files.read_error()
        metrics = files.read_metrics() if results is not None else []
    except DamagedFile as damaged:
        return Run(folder, config, damaged=str(damaged))
    if results is not None and isinstance(results.get("weights"), dict):
        config.update(flatten(results["weights"], WEIGHTS_PREFIX))
    return Run(folder, config, results, error, metrics)


def load_config(path: Path) -> dict[str, Any]:
    """The flattened config as the run saw it; interpolations that cannot be resolved here stay as text."""
    cfg = read_config(path)
    try:
        tree = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException:
        tree = OmegaConf.to_container(cfg, resolve=False)
    return flatten(tree)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their JSON text so that values can be compared and shown."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{path}."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, (list, tuple)) else value
    return flat

