"""File writes that survive crashes and full disks: a good file is never replaced by a half-written one.

Whole files (results, checkpoints, configs) go to a temporary file beside the target, are flushed to
the device (fsync: a full disk or a failing device is reported there, before the rename, not after
it) and only then renamed over the target. metrics.jsonl grows by one line per epoch and is appended
in place: an append that fails is cut off again, and a line torn by a kill is cut off before the next
append and left out when the file is read. A disk fault (no space, quota, read-only file system,
permission) becomes one TransferCliError naming the file and the cause; the previous file stays as
it was.
"""
from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Iterator

import torch

from transfer_cli.errors import TransferCliError

DISK_FAULTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
}


@contextmanager
def reported_disk_faults(path: Path) -> Iterator[None]:
    """Turn a disk fault while writing `path` into one line that names the file and the cause."""
    existed = os.path.exists(path)  # False, not an error, where the folder cannot be read
    try:
        yield
    except Exception as err:
        cause = _disk_fault(err)
        if cause is None or isinstance(err, TransferCliError):
            raise
        kept = f"the previous {path.name} is unchanged" if existed else "nothing was written"
        raise TransferCliError(
            f"could not write {path}: {DISK_FAULTS[cause.errno]} ({errno.errorcode[cause.errno]}); {kept}; "
            "free some space (or make the folder writable) and run the command again"
        ) from err


def _disk_fault(err: BaseException | None) -> OSError | None:
    """The disk fault behind an error, also where a library raised its own error while handling it
    (torch.save's writer does: "unexpected pos" with the OSError as its context)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FAULTS:
            return err
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; put it in place of `path` only if the block succeeds and
    the data reached the device."""
    path = Path(path)
    with reported_disk_faults(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual permissions
            yield tmp_path
            _fsync(tmp_path)
            os.replace(tmp_path, path)
            _fsync_folder(path.parent)  # the rename itself survives a power cut
        finally:
            with suppress(OSError):  # gone after the rename; on a read-only disk it cannot go
                tmp_path.unlink()


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    try:
        _fsync(folder)
    except OSError as err:
        if err.errno in DISK_FAULTS:
            raise
        # EINVAL: some file systems cannot sync a folder; the file itself is already on the device


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    # through a Python file: a full disk then raises OSError(ENOSPC), where torch's own writer only
    # says "unexpected pos"
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class DamagedFile(TransferCliError):
    """A file that exists but cannot be read back: cut short, overwritten with something else, edited.

    Its message names the file and the cause; a caller that knows what the file is for adds what to
    do about it (`advise`).
    """

    def __init__(self, path: str | os.PathLike, reason: str, what_to_do: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason})" + (f"; {what_to_do}" if what_to_do else ""))

    def advise(self, what_to_do: str) -> "DamagedFile":
        """The same fault, with what to do about it; raise it `from None` (the cause is in the line)."""
        return DamagedFile(self.path, self.reason, what_to_do)


def load_torch(path: str | os.PathLike) -> Any:
    """Load a checkpoint written by `save_torch`; weights_only so a file cannot run code. A file that
    cannot be loaded is a DamagedFile saying why: cut short, not a torch file, or pickled objects
    that weights-only loading refuses because loading them could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, ...
        raise DamagedFile(path, _why_unloadable(err)) from None


def _why_unloadable(err: Exception) -> str:
    text = str(err)
    refused = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), None)
    if "Weights only load failed" in text:
        detail = f": {refused}" if refused else ""
        return (f"it holds pickled Python objects that weights-only loading refuses, since loading them could run "
                f"code{detail}; save a plain state dict of tensors or a .safetensors file")
    first = (text.strip().splitlines() or [type(err).__name__])[0]
    return f"cut short, or not a torch file: {first}"


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file written by `write_json`; one that does not parse is a DamagedFile (cut short or edited)."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        cut = "not valid JSON" if text.rstrip().endswith(("}", "]")) else "cut short"  # write_json ends its files so
        raise DamagedFile(path, f"{cut}: {err.msg} at line {err.lineno} column {err.colno}") from None


def _json_line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, default=str) + "\n"


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Add one line, on the device when this returns; a failed append leaves the file as it was."""
    path = Path(path)
    line = _json_line(record).encode()
    with reported_disk_faults(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            size = _cut_torn_line(fd)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with suppress(OSError):
                    os.ftruncate(fd, size)  # no torn line left behind
                raise
        finally:
            os.close(fd)


def _cut_torn_line(fd: int) -> int:
    """Cut off a last line without its newline (a kill mid-append); return the file's size after."""
    size = os.fstat(fd).st_size
    end = size
    while end > 0:
        start = max(end - 4096, 0)
        newline = os.pread(fd, end - start, start).rfind(b"\n")
        if newline >= 0:
            keep = start + newline + 1
            break
        end = start
    else:
        keep = 0
    if keep < size:
        os.ftruncate(fd, keep)
    return keep


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write("".join(_json_line(r) for r in records))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines file. A last line without its newline was torn by a kill or a full
    disk while it was appended (it belongs to an epoch whose checkpoint was never written): it is left
    out. Any other line that is not JSON is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    records = []
    for number, line in enumerate(lines[:-1], 1):  # after the last newline: "" or the torn line
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DamagedFile(path, f"line {number} is not valid JSON: {err.msg}").advise(
                "delete that line, or start the run over in a new folder") from None
    return records
