"""A run's folder: the one place that names the files a run leaves behind and reads them back.

    <run>/
      .hydra/config.yaml    the composed config, as Hydra saved it (interpolations unresolved)
      metrics.jsonl         one record per epoch, appended as training goes
      results.json          the summary of a finished run (what tables and sweeps are built from)
      failed.json           a sweep job's error, instead of results.json
      eval.json             `transfer-cli eval`: the best checkpoint re-evaluated on the test split
      confusion_matrix.png  the test split's confusion matrix (trainer.confusion_png)
      predictions/          `transfer-cli predict`: <input name>.csv
      checkpoints/last.pt   everything needed to resume
      checkpoints/best.pt   the weights selected on validation
      analysis/             `transfer-cli analyze`: <name>.json, .md and .png
      tb/                   logger=tensorboard's event files (unless logger.log_dir says elsewhere)
      mlflow_run.json       logger=mlflow: which MLflow run a resumed run continues
      stage_<k>/            scenario=class_incremental: stage k's own metrics.jsonl and checkpoints/ (a run
                            folder of the loop's), stage.json (its test numbers) and end.pt (the model and
                            the strategy's state after the stage, kept for the latest finished stage only)

The CLI, eval and export, analysis, reporting and sweeps all go through here, so none of them
imports another to learn where a file is. It sits low in the package: it needs only the errors,
the file helpers and the config resolvers.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from transfer_cli import config_files  # noqa: F401  (registers ${asset:} for the configs read here)
from transfer_cli.errors import TransferCliError
from transfer_cli.io import DamagedFile, read_json, read_jsonl

HYDRA = ".hydra"
CONFIG_NAME = "config.yaml"
CONFIG = f"{HYDRA}/{CONFIG_NAME}"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
FAILED = "failed.json"
EVAL = "eval.json"
CONFUSION_PNG = "confusion_matrix.png"
PREDICTIONS = "predictions"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
ANALYSIS = "analysis"
TENSORBOARD = "tb"
MLFLOW_POINTER = "mlflow_run.json"
STAGE = "stage_{}"
STAGE_RECORD = "stage.json"
STAGE_END = "end.pt"


class RunFolder:
    """The paths inside one run's folder, and readers for the files other commands consume."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.config_file = self.path / CONFIG
        self.metrics_file = self.path / METRICS
        self.results_file = self.path / RESULTS
        self.failed_file = self.path / FAILED
        self.eval_file = self.path / EVAL
        self.confusion_png = self.path / CONFUSION_PNG
        self.predictions_dir = self.path / PREDICTIONS
        self.checkpoints_dir = self.path / CHECKPOINTS
        self.last_checkpoint = self.checkpoints_dir / LAST
        self.best_checkpoint = self.checkpoints_dir / BEST
        self.analysis_dir = self.path / ANALYSIS
        self.tensorboard_dir = self.path / TENSORBOARD
        self.mlflow_pointer = self.path / MLFLOW_POINTER

    def is_run(self) -> bool:
        """A folder is a run once Hydra saved its config there (done, failed or still unfinished)."""
        return self.config_file.exists()

    def read_results(self) -> Optional[dict]:
        """results.json, or None while the run has not finished; a damaged one says how to rebuild it."""
        if not self.results_file.exists():
            return None
        try:
            return read_json(self.results_file)
        except DamagedFile as damaged:
            raise damaged.advise(f"delete it and run again with trainer.resume=true hydra.run.dir={self.path}: "
                                 "the run's checkpoints test it again") from None

    def read_error(self) -> Optional[str]:
        """failed.json's one-line message, or None when no job failed here."""
        if not self.failed_file.exists():
            return None
        try:
            return read_json(self.failed_file).get("error", "failed")
        except DamagedFile as damaged:
            raise damaged.advise("delete it; the job's error is lost, running the job again says it anew") from None

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.metrics_file)

    def stage_dir(self, stage: int) -> Path:
        """A class-incremental run's stage folder: the loop's run folder for that stage."""
        return self.path / STAGE.format(stage)

    def stage_record(self, stage: int) -> Path:
        return self.stage_dir(stage) / STAGE_RECORD

    def stage_end(self, stage: int) -> Path:
        return self.stage_dir(stage) / STAGE_END


def run_config(run_dir: Path, overrides: Mapping[str, str]) -> DictConfig:
    """A finished run's recorded config (.hydra/config.yaml) with `overrides` (e.g. trainer.device) on top."""
    folder = RunFolder(run_dir)
    if not folder.is_run():
        raise TransferCliError(f"{run_dir} is not a run folder (no {CONFIG}); pass run=<a folder under runs/>")
    cfg = read_config(folder.config_file)
    OmegaConf.set_struct(cfg, True)
    try:
        return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    except Exception as err:  # omegaconf's errors for unknown keys and bad values
        raise TransferCliError(f"bad override for this run: {str(err).splitlines()[0]}") from None


def read_config(path: Path) -> DictConfig:
    """A run's saved config; one that does not parse (cut short, edited) is a DamagedFile."""
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - yaml's scanner and parser errors, omegaconf's own
        raise DamagedFile(path, f"not a readable config: {str(err).strip().splitlines()[0]}").advise(
            "the run's settings are lost with it: start the run over in a new folder") from None
    if not isinstance(cfg, DictConfig):
        raise DamagedFile(path, "not a mapping of config keys").advise("start the run over in a new folder")
    return cfg


def find_run_folders(folder: Path) -> list[Path]:
    """Every run folder under `folder` (itself included), in path order."""
    return sorted(p.parent.parent for p in Path(folder).rglob(CONFIG_NAME) if p.parent.name == HYDRA)
