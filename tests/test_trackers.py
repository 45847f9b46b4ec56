"""logger=tensorboard and logger=mlflow with the real libraries: what they hold equals metrics.jsonl."""
import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from transfer_cli.cli import main
from transfer_cli.engine.loop import Trainer
from transfer_cli.engine.run import run_training
from transfer_cli.errors import TransferCliError
from transfer_cli.io import read_jsonl
from transfer_cli.overrides import compose_config
from transfer_cli.reporting.trackers import build_tracker, numeric, open_tracker
from transfer_cli.run_folder import MLFLOW_POINTER
from transfer_cli.strategies import build_strategy
from tests.toy import ToyLoader, ToyModel, toy_config

SMOKE = ["trainer=smoke", "trainer.device=cpu"]
EPOCH_METRICS = {"train_loss", "train_acc1", "val_loss", "val_acc1", "epoch_time_s", "lr.head"}


def tensorboard_scalars(log_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag} logged twice at one step: {steps}"
        scalars[tag] = {e.step: e.value for e in events.Scalars(tag)}
    return scalars


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def mlflow_history(client, run_id) -> dict[str, dict[int, float]]:
    history = {}
    for key in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert len(steps) == len(set(steps)), f"{key} logged twice at one step: {steps}"
        history[key] = {m.step: m.value for m in client.get_metric_history(run_id, key)}
    return history


def per_epoch(metrics_jsonl) -> dict[str, dict[int, float]]:
    """metrics.jsonl as {metric: {epoch: value}}, the shape a tracker holds."""
    table: dict[str, dict[int, float]] = {}
    for record in read_jsonl(metrics_jsonl):
        for key, value in numeric(record, leave_out=("epoch", "step")).items():
            table.setdefault(key, {})[record["epoch"]] = value
    return table


def test_tensorboard_holds_every_epoch_of_metrics_jsonl_the_config_and_the_test_metrics(tmp_path):
    run_dir = tmp_path / "run"
    main(["train", *SMOKE, "logger=tensorboard", "strategy=l2sp", f"hydra.run.dir={run_dir}"])
    expected = per_epoch(run_dir / "metrics.jsonl")
    assert EPOCH_METRICS | {"train_penalty/l2sp"} <= set(expected) and len(expected["val_loss"]) == 2

    scalars = tensorboard_scalars(run_dir / "tb")
    for key, by_epoch in expected.items():
        assert scalars[key] == pytest.approx(by_epoch, rel=1e-6), key  # event files hold float32
    results = json.loads((run_dir / "results.json").read_text())
    assert scalars["test.acc1"] == pytest.approx({2: results["test"]["acc1"]})
    assert scalars["params.trainable"] == pytest.approx({2: results["params"]["trainable"]})

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: l2sp" in config_text and "max_train_batches: 2" in config_text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    hparams = events.PluginTagToContent("hparams")
    session = HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert session.hparams["strategy.name"].string_value == "l2sp" and session.hparams["seed"].number_value == 0
    experiment = HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert "test.acc1" in {m.name.tag for m in experiment.metric_infos}


def test_mlflow_holds_metrics_jsonl_params_config_and_results(tmp_path):
    run_dir, store = tmp_path / "run", tmp_path / "elsewhere" / "store"
    cfg = compose_config([*SMOKE, "logger=mlflow", f"logger.tracking_uri={store.as_uri()}",
                          "logger.experiment=fewshot", "seed=3"])
    results = run_training(cfg, run_dir)

    pointer = json.loads((run_dir / MLFLOW_POINTER).read_text())
    assert pointer["tracking_uri"] == store.as_uri() and (store / ".trash").is_dir()
    client = mlflow_client(pointer["tracking_uri"])
    run = client.get_run(pointer["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "fewshot"
    assert run.data.params["strategy.name"] == "finetune" and run.data.params["seed"] == "3"
    assert run.data.params["trainer.max_train_batches"] == "2" and run.data.params["logger.name"] == "mlflow"

    history = mlflow_history(client, pointer["run_id"])
    expected = per_epoch(run_dir / "metrics.jsonl")
    assert EPOCH_METRICS <= set(expected)
    assert {k: history[k] for k in expected} == expected  # float64 both sides: exact
    assert history["test.acc1"] == {2: results["test"]["acc1"]}
    assert history["best_epoch"] == {2: results["best_epoch"]}

    config_yaml = client.download_artifacts(pointer["run_id"], "config.yaml", str(tmp_path))
    assert OmegaConf.load(config_yaml).seed == 3


def test_mlflow_default_store_is_beside_the_run_folder_shared_by_a_sweep(tmp_path):
    cfg = compose_config(["logger=mlflow"])
    for job in ("0_seed=0", "1_seed=1"):  # two jobs of a sweep; what the store holds needs no training
        with open_tracker(cfg, tmp_path / job) as tracker:
            tracker.start(cfg, finished=[])
    pointers = [json.loads((tmp_path / job / MLFLOW_POINTER).read_text()) for job in ("0_seed=0", "1_seed=1")]
    assert {p["tracking_uri"] for p in pointers} == {(tmp_path / "mlruns").as_uri()}
    client = mlflow_client((tmp_path / "mlruns").as_uri())
    runs = [client.get_run(p["run_id"]) for p in pointers]
    assert [r.info.run_name for r in runs] == ["0_seed=0", "1_seed=1"]
    assert runs[0].info.experiment_id == runs[1].info.experiment_id  # one experiment for the sweep


def toy_fit(run_dir, logger, **trainer):
    torch.manual_seed(0)
    cfg = toy_config(**trainer)
    cfg.strategy = OmegaConf.create({"name": "finetune"})
    cfg.logger = OmegaConf.create(logger)
    with open_tracker(cfg, run_dir) as tracker:
        Trainer(ToyModel(), build_strategy(cfg), ToyLoader(), ToyLoader(shuffle=False), ToyLoader(shuffle=False),
                cfg, run_dir, tracker).fit()


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_a_run_killed_between_checkpoint_and_tracker_resumes_with_each_epoch_logged_once(tmp_path, monkeypatch,
                                                                                         logger):
    """Epoch 1's checkpoint is written, its tracker call dies; the resumed run replays epoch 1 from
    metrics.jsonl (epoch 0 is already there) and goes on: every epoch once, equal to metrics.jsonl."""
    from transfer_cli.reporting import trackers

    run_dir = tmp_path / "run"
    config = {"name": logger, "log_dir": None, "tracking_uri": None, "experiment": "resume", "run_name": None}
    cls = trackers.TensorBoardTracker if logger == "tensorboard" else trackers.MlflowTracker
    log_metrics = cls.log_metrics

    def killed_at_epoch_1(self, step, record):
        if step == 1:
            raise KeyboardInterrupt
        log_metrics(self, step, record)

    monkeypatch.setattr(cls, "log_metrics", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        toy_fit(run_dir, config)
    monkeypatch.setattr(cls, "log_metrics", log_metrics)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]
    if logger == "mlflow":
        pointer = json.loads((run_dir / MLFLOW_POINTER).read_text())
        client = mlflow_client(pointer["tracking_uri"])
        assert client.get_run(pointer["run_id"]).info.status == "FAILED"  # closed by open_tracker
        assert set(mlflow_history(client, pointer["run_id"])["val_loss"]) == {0}
    else:
        assert set(tensorboard_scalars(run_dir / "tb")["val_loss"]) == {0}

    toy_fit(run_dir, config, resume=True)
    expected = per_epoch(run_dir / "metrics.jsonl")
    assert set(expected["val_loss"]) == {0, 1, 2}
    if logger == "mlflow":
        assert client.get_run(pointer["run_id"]).info.status == "FINISHED"
        assert json.loads((run_dir / MLFLOW_POINTER).read_text()) == pointer  # the same MLflow run, continued
        history = mlflow_history(client, pointer["run_id"])
        assert {k: history[k] for k in expected} == expected
    else:
        scalars = tensorboard_scalars(run_dir / "tb")
        for key, by_epoch in expected.items():
            assert scalars[key] == pytest.approx(by_epoch, rel=1e-6), key


def test_unknown_logger_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "logger=wandb", f"hydra.run.dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == "transfer-cli: error: unknown logger 'wandb'; choose one of: mlflow, none, tensorboard"
    with pytest.raises(TransferCliError, match="unknown logger 'wandb'"):  # run_training without the CLI
        build_tracker(OmegaConf.create({"name": "wandb"}), tmp_path)


@pytest.mark.parametrize("logger, module, install", [
    ("tensorboard", "torch.utils.tensorboard", "pip install tensorboard"),
    ("mlflow", "mlflow.tracking", "pip install mlflow-skinny"),
])
def test_a_missing_tracker_package_is_one_line_saying_what_to_install(capsys, tmp_path, monkeypatch, logger,
                                                                      module, install):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if the package were not installed
    with pytest.raises(SystemExit):
        main(["train", *SMOKE, f"logger={logger}", f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"logger={logger} needs" in err and install in err, err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # failed before any training
