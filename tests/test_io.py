import json

import pytest

from transfer_cli.errors import TransferCliError
from transfer_cli.io import append_jsonl, atomic_path, read_jsonl, write_json, write_jsonl


def test_a_failed_write_leaves_the_old_file_untouched(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"acc": 0.9})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"acc": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_jsonl_roundtrip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"epoch": 0}, {"epoch": 1}])
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]


def test_a_line_torn_by_a_kill_is_left_out_and_cut_off_before_the_next_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_jsonl(path, [{"epoch": 0}, {"epoch": 1}])
    with open(path, "a") as f:
        f.write('{"epoch": 2, "val_ac')  # killed mid-append
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    append_jsonl(path, {"epoch": 2})
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}, {"epoch": 2}]
    assert path.read_text().count("\n") == 3


def test_a_torn_first_line_and_garbage_bytes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'\xff\x00{"ep')
    assert read_jsonl(path) == []
    append_jsonl(path, {"epoch": 0})
    assert path.read_bytes() == b'{"epoch": 0}\n'


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(TransferCliError, match=r"metrics.jsonl is damaged \(line 2 is not valid JSON"):
        read_jsonl(path)
