"""Data-parallel training (torchrun / DDP with gloo on this CPU): each process trains on its own disjoint
half of every epoch, gradients are averaged (the processes end with identical weights), and the
metrics and test accuracy are those of the whole data, written once by rank 0."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from transfer_cli.data.tensor_batches import TensorLoader
from transfer_cli.engine import distributed
from transfer_cli.engine.evaluate import evaluate
from transfer_cli.engine.loop import Trainer
from transfer_cli.strategies import build_strategy
from tests.toy import ToyModel, toy_config

N_TRAIN, N_VAL, N_TEST, BATCH, EPOCHS = 24, 7, 11, 4, 2


def toy_split(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 8, 8, generator=g)
    return images, (images[:, 0].mean(dim=(1, 2)) > 0).long()


class Recording:
    """make_batch for a TensorLoader that remembers which examples each batch held."""

    def __init__(self, images: torch.Tensor):
        self.images, self.seen = images, []

    def __call__(self, index: torch.Tensor) -> dict:
        self.seen.append(index.tolist())
        return {"pixel_values": self.images[index]}


def loader(n: int, seed: int, train: bool) -> TensorLoader:
    images, labels = toy_split(n, seed)
    return TensorLoader(labels, Recording(images), BATCH, shuffle=train, seed=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world_size: int, port: int) -> None:
    """What torchrun gives a process: its place in the environment, then the gloo group joined."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init("cpu")


def train_one_process(rank: int, world_size: int, port: int, out: str) -> None:
    """One torchrun-like process: join the group, train the toy model, save what the test checks."""
    join_group(rank, world_size, port)
    try:
        torch.manual_seed(0)
        cfg = toy_config(max_epochs=EPOCHS)
        cfg.strategy = OmegaConf.create({"name": "finetune"})
        train, val, test = loader(N_TRAIN, 1, True), loader(N_VAL, 2, False), loader(N_TEST, 3, False)
        seen_per_epoch = []

        class PerEpoch:  # the train batches each epoch served to this process
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def __len__(self):
                return len(self.inner)

            def __iter__(self):
                return iter(self.inner)

            def set_epoch(self, epoch):
                self.inner.set_epoch(epoch)
                train.make_batch.seen = []
                seen_per_epoch.append(train.make_batch.seen)

        model = ToyModel()
        fit = Trainer(model, build_strategy(cfg), PerEpoch(train), val, test, cfg, Path(out) / "run").fit()
        torch.save({"seen": seen_per_epoch, "state": model.state_dict(), "test": fit.test,
                    "steps": fit.state.step, "samples": fit.state.train_samples}, Path(out) / f"rank{rank}.pt")
    finally:
        distributed.shutdown()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(train_one_process, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_loader_shards_are_disjoint_equal_halves_of_the_same_permutation():
    images, labels = toy_split(N_TRAIN + 1, 0)  # odd: the remainder is dropped so both take the same steps
    shards = []
    for rank in range(2):
        train = TensorLoader(labels, lambda i: {"pixel_values": images[i]}, BATCH, shuffle=True, seed=5)
        train.shard(rank, 2, even=True)
        train.set_epoch(3)
        shards.append(torch.cat(list(train.batch_indices())))
        assert len(train) == 3  # 12 examples in batches of 4
        with train.stored_order():  # a pass over every example (feature caching) ignores the shard
            assert torch.equal(torch.cat(list(train.batch_indices())), torch.arange(N_TRAIN + 1))
    assert len(shards[0]) == len(shards[1]) == N_TRAIN // 2
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    whole = TensorLoader(labels, lambda i: {"pixel_values": images[i]}, 2 * BATCH, shuffle=True, seed=5)
    whole.set_epoch(3)
    # the two processes' i-th batches together are the i-th batch of one process with twice the batch
    for i, big in enumerate(whole.batch_indices()):
        if len(big) == 2 * BATCH:
            assert sorted(big.tolist()) == sorted(shards[0][i * BATCH:(i + 1) * BATCH].tolist()
                                                  + shards[1][i * BATCH:(i + 1) * BATCH].tolist())
    test = [TensorLoader(labels, lambda i: {"pixel_values": images[i]}, BATCH, shuffle=False, seed=0)
            for _ in range(2)]
    for rank, part in enumerate(test):
        part.shard(rank, 2, even=False)  # evaluation keeps every example
    assert sorted(torch.cat([torch.cat(list(t.batch_indices())) for t in test]).tolist()) == list(range(N_TRAIN + 1))


@pytest.mark.slow
def test_each_process_trains_on_its_own_half_of_every_epoch(two_processes):
    _, ranks = two_processes
    for epoch in range(EPOCHS):
        halves = [sorted(i for batch in r["seen"][epoch] for i in batch) for r in ranks]
        assert [len(h) for h in halves] == [N_TRAIN // 2] * 2
        assert sorted(halves[0] + halves[1]) == list(range(N_TRAIN))
        assert all(len(batch) == BATCH for r in ranks for batch in r["seen"][epoch])  # per-process batch
    assert ranks[0]["seen"][0] != ranks[0]["seen"][1]  # reshuffled each epoch
    assert all(r["steps"] == EPOCHS * N_TRAIN // (2 * BATCH) for r in ranks)
    assert all(r["samples"] == EPOCHS * N_TRAIN for r in ranks)  # the global count, on every process


@pytest.mark.slow
def test_gradients_are_averaged_so_weights_stay_identical(two_processes):
    _, ranks = two_processes
    torch.manual_seed(0)
    start = ToyModel().state_dict()
    for name, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][name]), name
    assert not torch.equal(ranks[0]["state"]["head.weight"], start["head.weight"])  # it did train


@pytest.mark.slow
def test_test_metrics_are_those_of_the_whole_test_set_and_only_rank_0_writes(two_processes):
    out, ranks = two_processes
    model = ToyModel()
    model.load_state_dict(ranks[0]["state"])
    strategy = build_strategy(OmegaConf.create({**toy_config(), "strategy": {"name": "finetune"}}))
    whole = evaluate(model, strategy, loader(N_TEST, 3, False), torch.device("cpu"), "fp32", detailed=True)
    for r in ranks:
        assert r["test"]["n"] == N_TEST
        assert r["test"]["confusion"] == whole["confusion"]  # summed over the processes' shards
        for name in ("acc1", "acc5", "mean_class_acc", "macro_f1"):
            assert r["test"][name] == whole[name], name
        for name in ("loss", "ece"):  # float sums in another order
            assert r["test"][name] == pytest.approx(whole[name], rel=1e-6), name
    metrics = (out / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in metrics] == list(range(EPOCHS))  # one line per epoch, not two


@pytest.mark.slow
def test_torchrun_cli_writes_one_run_folder_with_global_results(tmp_path):
    from transfer_cli.run_folder import run_config
    from transfer_cli.engine.evaluate_run import evaluate_run

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "transfer_cli", "train", "trainer=smoke", "trainer.max_val_batches=null", "trainer.max_test_batches=null", "trainer.max_epochs=1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("test acc1") == 1  # printed by rank 0 only
    runs = list((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 1  # both processes used rank 0's folder, whatever their clocks said
    results = json.loads((runs[0] / "results.json").read_text())
    assert results["world_size"] == 2 and results["batch_size"] == {"per_process": 8, "global": 16}
    single = evaluate_run(run_config(runs[0], {}), runs[0])["test"]  # one process, the whole test split
    assert results["test"]["n"] == single["n"] == 539  # the digits' fixed 30% test split
    assert results["test"]["acc1"] == single["acc1"]
    assert results["test"]["loss"] == pytest.approx(single["loss"], rel=1e-6)
