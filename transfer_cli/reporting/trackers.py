"""Experiment trackers (`logger=tensorboard`, `logger=mlflow`): the per-epoch metrics, the resolved config
and the final results of a run, sent to a tracking tool besides metrics.jsonl and results.json.

The loop hands each tracker the same record it appends to metrics.jsonl, after the epoch's checkpoint
is written; a resumed run first replays the epochs metrics.jsonl kept, so the tracker ends with one
value per metric and epoch, as metrics.jsonl does. A tracker's library is imported only when its
logger is chosen.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlparse

from omegaconf import DictConfig, OmegaConf

from transfer_cli.errors import TransferCliError
from transfer_cli.io import write_json
from transfer_cli.reporting.runs import flatten
from transfer_cli.run_folder import RunFolder

# results.json entries that are not numbers to plot (the config is logged on its own)
NOT_FINAL_METRICS = ("config", "full_config", "versions")
MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch call


def numeric(record: dict[str, Any], leave_out: tuple[str, ...] = ()) -> dict[str, float]:
    """The numbers of a metrics.jsonl record or of results.json, flattened."""
    flat = flatten({k: v for k, v in record.items() if k not in leave_out})
    return {k: float(v) for k, v in flat.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """`logger=none`, and the interface every tracker implements; each call is a no-op here."""

    def start(self, config: DictConfig, finished: list[dict]) -> None:
        """Begin the tracked run, or continue it when `finished` (metrics.jsonl's records of a resumed
        run) is not empty, logging those records first; record the resolved config."""

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        """One metrics.jsonl record; its numbers are logged at x = `step` (the epoch)."""

    def log_final(self, results: dict[str, Any]) -> None:
        """results.json's numbers (test metrics, best epoch, parameter counts, train time)."""

    def close(self, failed: bool) -> None:
        """Flush and end the tracked run; `failed` marks a run that raised. Safe before `start`."""


def build_tracker(logger: Optional[DictConfig], run_dir: Path) -> Tracker:
    """The tracker `cfg.logger` names; imports its library now so that a missing one fails before training."""
    name = "none" if logger is None else str(logger.name)
    if name == "none":
        return Tracker()
    if name == "tensorboard":
        return TensorBoardTracker(logger, run_dir)
    if name == "mlflow":
        return MlflowTracker(logger, run_dir)
    raise TransferCliError(f"unknown logger {name!r}; choose one of: none, tensorboard, mlflow")


@contextmanager
def open_tracker(cfg: DictConfig, run_dir: Path) -> Iterator[Tracker]:
    """The run's tracker, closed however the block ends (marked failed when it raised)."""
    tracker = build_tracker(cfg.get("logger"), Path(run_dir))
    try:
        yield tracker
    except BaseException:
        tracker.close(failed=True)
        raise
    tracker.close(failed=False)


def _missing(logger: str, package: str, err: ImportError) -> TransferCliError:
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return TransferCliError(f"logger={logger} needs the {package} package ({reason}): pip install {package} "
                            "(or pip install 'transfer-cli[trackers]'), or use logger=none")


def _config_yaml(config: DictConfig) -> str:
    return OmegaConf.to_yaml(config, resolve=True)


class TensorBoardTracker(Tracker):
    """Event files in `logger.log_dir` (default <run>/tb): scalars per epoch, the config as text, and
    hparams (the flattened config against the final metrics) for TensorBoard's HPARAMS tab."""

    def __init__(self, logger: DictConfig, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as err:
            raise _missing("tensorboard", "tensorboard", err) from None
        self._writer_class, self._hparams = SummaryWriter, hparams
        self.log_dir = Path(logger.log_dir).expanduser() if logger.get("log_dir") else RunFolder(run_dir).tensorboard_dir
        self.writer = None
        self.params: dict[str, Any] = {}

    def start(self, config: DictConfig, finished: list[dict]) -> None:
        # a resumed run hides every event of the earlier session (purge_step=0) and replays metrics.jsonl
        self.writer = self._writer_class(str(self.log_dir), purge_step=0 if finished else None)
        yaml = _config_yaml(config)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in yaml.splitlines()), 0)
        self.params = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                       for k, v in flatten(OmegaConf.to_container(config, resolve=True)).items()}
        for record in finished:
            self.log_metrics(int(record["epoch"]), record)

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        for tag, value in numeric(record, leave_out=("epoch", "step")).items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def log_final(self, results: dict[str, Any]) -> None:
        final = numeric(results, leave_out=NOT_FINAL_METRICS)
        step = int(results.get("epochs", 0))
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)
        file_writer = self.writer._get_file_writer()  # add_hparams would write to a folder of its own
        for summary in self._hparams(self.params, final):
            file_writer.add_summary(summary, step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MlflowTracker(Tracker):
    """An MLflow run: the flattened config as params, its YAML as the artifact config.yaml, one metric
    per number of metrics.jsonl with the epoch as step, and results.json's numbers.

    The default store is a local file store beside the run folder (<run>/../mlruns), so the jobs of a
    sweep share one; `logger.tracking_uri` takes any MLflow URI (sqlite:///..., http://server:5000).
    """

    def __init__(self, logger: DictConfig, run_dir: Path):
        self.run_dir = run_dir
        uri = logger.get("tracking_uri") or (run_dir.resolve().parent / "mlruns").as_uri()
        self.store = _local_store(uri)
        if self.store is not None:
            # MLflow 3 keeps the file store behind this opt-in; it is the one store that needs no server or database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            from mlflow.entities import Metric, Param
            from mlflow.tracking import MlflowClient
        except ImportError as err:
            raise _missing("mlflow", "mlflow-skinny", err) from None
        self._metric, self._param = Metric, Param
        self.client = MlflowClient(tracking_uri=uri)
        self.uri, self.experiment = uri, str(logger.experiment)
        self.run_name = logger.get("run_name") or run_dir.name
        self.run_id: Optional[str] = None
        self.logged: set[tuple[str, int]] = set()  # (metric, step) pairs the run already holds

    def start(self, config: DictConfig, finished: list[dict]) -> None:
        pointer = RunFolder(self.run_dir).mlflow_pointer
        previous = json.loads(pointer.read_text()) if finished and pointer.exists() else {}
        if previous.get("tracking_uri") == self.uri:
            self.run_id = previous["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            self.logged = {(key, m.step) for key in self.client.get_run(self.run_id).data.metrics
                           for m in self.client.get_metric_history(self.run_id, key)}
        else:
            run = self.client.create_run(self._experiment_id(), run_name=self.run_name,
                                         tags={"transfer_cli.run_dir": str(self.run_dir.resolve())})
            self.run_id = run.info.run_id
            write_json(pointer, {"tracking_uri": self.uri, "run_id": self.run_id})
        self._log_params(config)
        self.client.log_text(self.run_id, _config_yaml(config), "config.yaml")
        for record in finished:
            self.log_metrics(int(record["epoch"]), record)

    def log_metrics(self, step: int, record: dict[str, Any]) -> None:
        self._log(numeric(record, leave_out=("epoch", "step")), step)

    def log_final(self, results: dict[str, Any]) -> None:
        self._log(numeric(results, leave_out=NOT_FINAL_METRICS), int(results.get("epochs", 0)))

    def close(self, failed: bool) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
            self.run_id = None

    def _log(self, values: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for k, v in values.items() if (k, step) not in self.logged]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
        self.logged.update((m.key, step) for m in metrics)

    def _log_params(self, config: DictConfig) -> None:
        """The flattened config; a resumed run keeps the values it started with (MLflow forbids changing a param)."""
        existing = self.client.get_run(self.run_id).data.params
        params = [self._param(k, str(v)) for k, v in flatten(OmegaConf.to_container(config, resolve=True)).items()
                  if k not in existing]
        for i in range(0, len(params), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_BATCH])

    def _experiment_id(self) -> str:
        """Get or create the experiment; the jobs of a local sweep start together, so a file store is locked."""
        with _locked(self.store):
            found = self.client.get_experiment_by_name(self.experiment)
            return found.experiment_id if found else self.client.create_experiment(self.experiment)


def _local_store(uri: str) -> Optional[Path]:
    """The folder of a file store (file:/path or a plain path); None for a database, a server or Databricks."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    return Path(uri).expanduser() if not parsed.scheme and uri != "databricks" else None


@contextmanager
def _locked(folder: Optional[Path]) -> Iterator[None]:
    if folder is None:
        yield
        return
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".transfer-cli.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
