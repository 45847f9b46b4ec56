"""Disk faults while a run writes: no space left, a folder that turns read-only, no permission.

Each writer of transfer_cli.io gets the fault injected where real disks report it (creating the
temporary file, writing, flushing to the device), then the real thing on a small tmpfs mounted by
the test: a full disk, a read-only remount, and a training run whose disk fills in its second epoch
and that, once space is freed, resumes to exactly the numbers of an uninterrupted run. Mounting needs
root with CAP_SYS_ADMIN; where that is missing only the tmpfs cases are skipped, with that reason.
"""
import errno
import json
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from transfer_cli import io
from transfer_cli.cli import main
from transfer_cli.errors import TransferCliError

GOOD = {"test": {"acc1": 0.9}}
NEW = {"test": {"acc1": 0.1}, "padding": "x" * 50_000}


def write_with(writer: str, path: Path, data: dict) -> None:
    if writer == "write_json":
        io.write_json(path, data)
    elif writer == "save_torch":
        io.save_torch(path, {"state": torch.arange(len(json.dumps(data)) // 8, dtype=torch.float64), "data": data})
    elif writer == "write_jsonl":
        io.write_jsonl(path, [data])
    else:
        io.append_jsonl(path, data)


def contents(path: Path) -> bytes:
    return path.read_bytes()


def only_file_left(folder: Path, name: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == [name], "a temporary file was left behind"


def fault(code: int):
    def raise_fault(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return raise_fault


WRITERS = ["write_json", "save_torch", "write_jsonl", "append_jsonl"]
# (what fails, errno): creating the temporary file / opening for append, and flushing to the device
INJECTED = [("mkstemp", errno.EROFS), ("mkstemp", errno.EACCES), ("fsync", errno.ENOSPC), ("fsync", errno.EDQUOT)]


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("where, code", INJECTED)
def test_an_injected_disk_fault_is_one_line_and_the_good_file_stays(writer, where, code, tmp_path, monkeypatch):
    path = tmp_path / "target"
    write_with(writer, path, GOOD)
    before = contents(path)
    if where == "mkstemp":
        target = (tempfile, "mkstemp") if writer != "append_jsonl" else (io.os, "open")
    else:
        target = (io.os, "fsync")
    monkeypatch.setattr(*target, fault(code))
    with pytest.raises(TransferCliError) as caught:
        write_with(writer, path, NEW)
    monkeypatch.undo()
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"could not write {path}: ") and errno.errorcode[code] in message
    assert io.DISK_FAULTS[code] in message and "the previous target is unchanged" in message
    assert contents(path) == before
    only_file_left(tmp_path, "target")


def test_an_append_that_fails_half_way_is_cut_off_again(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    io.append_jsonl(path, {"epoch": 0})
    before = contents(path)
    real_write = os.write

    def half_then_full(fd, data):  # the device takes part of the line, then is full
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(io.os, "write", half_then_full)
    with pytest.raises(TransferCliError, match="no space left on the device"):
        io.append_jsonl(path, {"epoch": 1, "val_acc1": 0.5})
    monkeypatch.undo()
    assert contents(path) == before
    io.append_jsonl(path, {"epoch": 1})
    assert io.read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]


def test_other_os_errors_are_not_dressed_up_as_disk_faults(tmp_path, monkeypatch):
    monkeypatch.setattr(io.os, "fsync", fault(errno.EBADF))
    with pytest.raises(OSError) as caught:
        io.write_json(tmp_path / "results.json", GOOD)
    assert not isinstance(caught.value, TransferCliError) and caught.value.errno == errno.EBADF


def test_a_missing_file_says_nothing_was_written(tmp_path, monkeypatch):
    monkeypatch.setattr(io.os, "fsync", fault(errno.ENOSPC))
    with pytest.raises(TransferCliError, match="nothing was written"):
        io.write_json(tmp_path / "results.json", GOOD)
    assert list(tmp_path.iterdir()) == []


# ---- the real thing: a small tmpfs -------------------------------------------------------------
def mount(folder: Path, options: str, remount: bool = False) -> None:
    command = ["mount", "-t", "tmpfs", "-o", f"remount,{options}" if remount else options, "tmpfs", str(folder)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise OSError(done.stderr.strip() or f"mount exited {done.returncode}")


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 1 MiB at tmp_path/disk, unmounted afterwards; skipped where mounting is not permitted."""
    folder = tmp_path / "disk"
    folder.mkdir()
    try:
        mount(folder, "size=1m")
    except OSError as err:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {err}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path, leave_bytes: int) -> None:
    """Take all but about `leave_bytes` of the file system's free space."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    (folder / "ballast").write_bytes(b"\0" * max(free - leave_bytes, 0))


def test_a_full_disk_while_saving_a_checkpoint(small_disk):
    last = small_disk / "checkpoints" / "last.pt"
    io.save_torch(last, {"model": torch.zeros(1000)})
    good = io.load_torch(last)
    fill(small_disk, leave_bytes=64 * 1024)
    with pytest.raises(TransferCliError) as caught:
        io.save_torch(last, {"model": torch.ones(100_000)})  # 400 kB
    assert str(caught.value).startswith(f"could not write {last}: no space left on the device (ENOSPC); "
                                        "the previous last.pt is unchanged")
    assert torch.equal(io.load_torch(last)["model"], good["model"])
    only_file_left(last.parent, "last.pt")


def test_a_full_disk_while_appending_metrics_keeps_every_whole_line(small_disk):
    metrics = small_disk / "metrics.jsonl"
    io.append_jsonl(metrics, {"epoch": 0})
    fill(small_disk, leave_bytes=0)
    big = {"epoch": 1, "padding": "x" * 200_000}
    with pytest.raises(TransferCliError, match=f"could not write {metrics}: no space left"):
        io.append_jsonl(metrics, big)
    assert io.read_jsonl(metrics) == [{"epoch": 0}]
    assert metrics.read_bytes().endswith(b"\n")


def test_a_folder_that_turns_read_only(small_disk):
    results, metrics = small_disk / "results.json", small_disk / "metrics.jsonl"
    io.write_json(results, GOOD)
    io.append_jsonl(metrics, {"epoch": 0})
    mount(small_disk, "ro", remount=True)
    for write, path in ((lambda: io.write_json(results, NEW), results),
                        (lambda: io.append_jsonl(metrics, {"epoch": 1}), metrics)):
        with pytest.raises(TransferCliError) as caught:
            write()
        assert str(caught.value).startswith(f"could not write {path}: the file system is read-only (EROFS)")
    assert json.loads(results.read_text()) == GOOD and io.read_jsonl(metrics) == [{"epoch": 0}]


RUN = ["train", "trainer=smoke", "trainer.device=cpu", "trainer.max_epochs=3", "trainer.num_threads=1"]


@pytest.mark.slow
def test_a_run_whose_disk_fills_stops_with_one_line_and_resumes_to_the_same_numbers(small_disk, tmp_path, capsys):
    reference = tmp_path / "reference"
    main([*RUN, f"hydra.run.dir={reference}"])
    expected = json.loads((reference / "results.json").read_text())
    sizes = {name: (reference / "checkpoints" / name).stat().st_size for name in ("last.pt", "best.pt")}
    # room for epoch 0's best.pt and last.pt, not for the temporary copy epoch 1 writes beside them
    mount(small_disk, f"size={sizes['last.pt'] + sizes['best.pt'] + sizes['last.pt'] // 4}", remount=True)
    run_dir = small_disk / "run"
    with pytest.raises(SystemExit) as exit_info:
        main([*RUN, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert "no space left on the device (ENOSPC)" in err[0] and str(run_dir / "checkpoints") in err[0]
    assert "is unchanged" in err[0]
    saved = io.load_torch(run_dir / "checkpoints" / "last.pt")
    assert saved["train_state"]["epoch"] == 1  # epoch 0's checkpoint, intact
    assert not (run_dir / "results.json").exists()

    mount(small_disk, "size=64m", remount=True)  # space freed
    main([*RUN, f"hydra.run.dir={run_dir}", "trainer.resume=true"])
    resumed = json.loads((run_dir / "results.json").read_text())
    assert (resumed["test"], resumed["best_epoch"]) == (expected["test"], expected["best_epoch"])
    assert [r["epoch"] for r in io.read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
