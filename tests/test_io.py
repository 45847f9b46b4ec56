import json

import pytest

from transfer_cli.io import atomic_path, read_jsonl, write_json, write_jsonl


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
