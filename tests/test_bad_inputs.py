"""Bad input, end to end through `transfer-cli train`: each case is one line on stderr, exit status 2, no
traceback, and nothing overwritten. The cases that can reach a folder holding a finished run are aimed
at a copy of one, which must come out byte for byte as it went in (.hydra/ included); the others run
into a fresh folder, which must get no checkpoint, metrics or results. README's "Reliability" lists
every case (the table's rows are this file's CASES and the ones in tests/test_cli.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_cli.cli import main
from tests.test_cli import SMOKE, fails_with

IGNORED = {"cli.log", ".lock"}  # Hydra's log is appended to; the lock file records who held the folder


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in IGNORED}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}"])
    assert (run_dir / "results.json").exists()
    return run_dir


# ---- inputs ----------------------------------------------------------------------------------
def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def text_rows(n: int = 6) -> str:
    return "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(n))


def csv_data(tmp: Path, content: str | bytes, name: str = "train.csv", *extra: str) -> list[str]:
    return ["data=csv_text", f"data.train_file={write(tmp / name, content)}", *extra]


def with_test_file(tmp: Path, test_rows: str, extra_train_rows: str = "") -> list[str]:
    test = write(tmp / "test.csv", "text,label\n" + test_rows)
    return csv_data(tmp, "text,label\n" + text_rows(8) + extra_train_rows, "train.csv", f"data.test_file={test}")


def image_tree(root: Path, per_class: int = 2) -> Path:
    """root/train, root/val, root/test with classes a and b: no carving, every class in every split."""
    for split, n in (("train", per_class), ("val", 1), ("test", 1)):
        for label, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (10, 10), colour).save(folder / f"{i}.png")
    return root


def images(tmp: Path, bad: Callable[[Path], None], *extra: str) -> list[str]:
    root = image_tree(tmp / "images")
    bad(root / "train" / "a")
    return ["data=imagefolder", f"data.root={root}", "data.num_workers=0", "data.augment=false", *extra]


def truncated_jpeg(folder: Path) -> None:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "cut.jpg")
    data = (folder / "cut.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[:len(data) // 2])


def decompression_bomb(folder: Path) -> None:
    Image.new("1", (20000, 20000)).save(folder / "bomb.png")  # 400 Mpx in about 50 kB


def symlink_loop(folder: Path) -> None:
    os.symlink(folder, folder / "loop")


class Evil:
    """Pickles to a call of os.system: what a weights-only load must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_with_code(tmp: Path) -> list[str]:
    torch.save({"conv.weight": torch.zeros(1), "x": Evil(tmp / "code_ran")}, tmp / "evil.pth")
    return [f"backbone.weights={tmp / 'evil.pth'}"]


def truncated_weights(tmp: Path) -> list[str]:
    torch.save({"w": torch.zeros(1000)}, tmp / "cut.pth")
    (tmp / "cut.pth").write_bytes((tmp / "cut.pth").read_bytes()[:300])
    return [f"backbone.weights={tmp / 'cut.pth'}"]


def remote_code_folder(tmp: Path) -> list[str]:
    folder = tmp / "custom_model"
    write(folder / "config.json", json.dumps({"model_type": "custom_thing", "architectures": ["CustomModel"],
                                              "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                                                           "AutoModel": "modeling_custom.CustomModel"}}))
    for module in ("configuration_custom.py", "modeling_custom.py"):
        write(folder / module, f"open({str(tmp / 'code_ran')!r}, 'w').close()\n")
    return ["backbone=hf", f"backbone.weights={folder}", *csv_data(tmp, "text,label\n" + text_rows())]


# (id, overrides from the test's folder, what the line must say, whether the folder may hold a finished run)
CASES = [
    ("csv-without-text-column", lambda t: csv_data(t, "body,label\nhello,a\n"),
     "column 'text' not in .*train.csv \\(columns: body, label\\); set data.text_column=", True),
    ("csv-without-label-column", lambda t: csv_data(t, "text,sentiment\nhello,a\n"),
     "column 'label' not in .*train.csv \\(columns: text, sentiment\\); set data.label_column=", True),
    ("empty-csv", lambda t: csv_data(t, ""), "text file .*train.csv has no rows", True),
    ("csv-with-a-header-only", lambda t: csv_data(t, "text,label\n"), "text file .*train.csv has no rows", True),
    ("malformed-jsonl-line", lambda t: csv_data(t, '{"text": "a", "label": "x"}\n{"text": "b", "label"\n', "train.jsonl"),
     "line 2 of .*train.jsonl is not JSON", True),
    ("jsonl-line-not-an-object", lambda t: csv_data(t, '{"text": "a", "label": "x"}\n[1, 2]\n', "train.jsonl"),
     "line 2 of .*train.jsonl is list, not an object", True),
    ("non-utf8-text", lambda t: csv_data(t, "text,label\nok,a\ncaf\xe9,b\n".encode("latin-1")),
     "train.csv is not UTF-8: byte 0xe9 on line 3 cannot be decoded; save it as UTF-8", True),
    ("test-label-never-seen-in-training", lambda t: with_test_file(t, "x,pos\ny,neutral\n"),
     "the test split has class 'neutral' \\(1 example\\(s\\)\\) that no training example has", True),
    ("class-too-small-for-validation", lambda t: with_test_file(t, "x,pos\ny,rare\n", "lonely,rare\n"),
     "class 'rare' has 1 example\\(s\\) to carve from, too few to carve the val split .*it needs at least 2", True),
    ("class-too-small-for-test", lambda t: csv_data(t, "text,label\n" + text_rows(8) + "lonely,rare\n"),
     "class 'rare' has 1 example\\(s\\) to carve from, too few to carve the test split .*it needs at least 3", True),
    ("duplicate-data-classes", lambda t: ["data.classes=[1,2,1]"], "data.classes names a class twice", True),
    ("symlink-loop-in-image-folder", lambda t: images(t, symlink_loop), "links back to .* \\(a symlink loop\\)", True),
    ("truncated-jpeg", lambda t: images(t, truncated_jpeg),
     "cannot read image .*cut.jpg \\(.*\\); fix or remove the file, or set data.skip_bad_images=true", False),
    ("zero-byte-image", lambda t: images(t, lambda f: write(f / "empty.png", b"")),
     "cannot read image .*empty.png \\(cannot identify image file", False),
    ("decompression-bomb", lambda t: images(t, decompression_bomb),
     "cannot read image .*bomb.png \\(.*decompression bomb", False),
    ("negative-learning-rate", lambda t: ["optim.lr=-0.1"], "optim.lr=-0.1 must be a positive number", True),
    ("zero-learning-rate", lambda t: ["optim.lr=0"], "optim.lr=0 must be a positive number", True),
    ("zero-batch-size", lambda t: ["trainer.batch_size=0"], "trainer.batch_size=0 must be at least 1", True),
    ("zero-grad-clip", lambda t: ["trainer.grad_clip=0"], "trainer.grad_clip=0 must be positive", True),
    ("weights-that-are-a-folder", lambda t: [f"backbone.weights={t}"],
     "backbone.weights=.* is a folder; a timm backbone takes one weights file", True),
    ("weights-pickle-with-code", pickle_with_code,
     "cannot read backbone.weights=.*evil.pth: it holds pickled Python objects that weights-only loading refuses, "
     "since loading them could run code: .*GLOBAL posix.system", True),
    ("truncated-weights", truncated_weights, "cannot read backbone.weights=.*cut.pth: cut short, or not a torch file",
     True),
    ("hf-folder-needing-remote-code", remote_code_folder,
     "needs its own Python code to load .*unless backbone.trust_remote_code=true", True),
    ("name-escaping-its-folder", lambda t: ["name=../../x"],
     "name='../../x' would make the run folder a path outside its parent folder", True),
]


SLOW = {"hf-folder-needing-remote-code", "decompression-bomb"}  # transformers' import; a 400 Mpx header


@pytest.mark.parametrize("make, expected, into_finished_run", [
    pytest.param(*case[1:], id=case[0], marks=[pytest.mark.slow] if case[0] in SLOW else []) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_overwrites_nothing(make, expected, into_finished_run, tmp_path, capsys,
                                                             finished_run):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    overrides = make(inputs)
    before_inputs = snapshot(inputs)
    run_dir = tmp_path / "run"
    if into_finished_run:
        shutil.copytree(finished_run, run_dir)
    before = snapshot(run_dir) if run_dir.exists() else {}
    err = fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={run_dir}", *overrides])
    assert re.search(expected, err), err
    assert snapshot(inputs) == before_inputs
    assert not (inputs / "code_ran").exists()  # no code in a weights file or a model folder ran
    if into_finished_run:
        assert snapshot(run_dir) == before
    else:
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()


def test_a_refused_command_keeps_the_runs_saved_config(finished_run, tmp_path, capsys):
    """Hydra saves each command's config in its folder before anything is checked; a refused command
    puts the run's own back, so eval and resume still read what the run was trained with."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    saved = (run_dir / ".hydra" / "config.yaml").read_text()
    fails_with(capsys, ["train", *SMOKE, f"hydra.run.dir={run_dir}", "seed=7"])  # already holds a run
    assert (run_dir / ".hydra" / "config.yaml").read_text() == saved


# ---- inputs that look bad but must work ---------------------------------------------------------
def test_rgba_greyscale_16_bit_and_cmyk_images_are_converted():
    from transfer_cli.data.image_decode import convert

    grey16 = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257))  # 0..65535
    assert grey16.mode == "I;16"
    scaled = np.asarray(convert(grey16, "RGB"))
    assert scaled.shape == (16, 16, 3) and scaled.min() == 0 and scaled.max() == 255
    assert np.array_equal(scaled[..., 0].ravel(), np.arange(256))  # scaled, not clipped to white
    assert np.asarray(convert(Image.fromarray(np.full((4, 4), 70000, dtype=np.int32)), "L")).max() == 255
    rgba = Image.new("RGBA", (4, 4), (10, 200, 30, 0))
    assert np.asarray(convert(rgba, "RGB"))[0, 0].tolist() == [10, 200, 30]  # alpha dropped, as torchvision does
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    assert np.asarray(convert(cmyk, "RGB"))[0, 0].tolist() == [255, 0, 0]
    grey = Image.new("L", (4, 4), 90)
    assert np.asarray(convert(grey, "RGB"))[0, 0].tolist() == [90, 90, 90]
    assert np.asarray(convert(Image.new("RGB", (4, 4), (255, 0, 0)), "L"))[0, 0] == 76  # ITU-R 601 luma
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.info["transparency"] = 0
    assert np.asarray(convert(palette, "RGB"))[0, 0].tolist() == [0, 255, 0]


def test_an_exif_rotated_photo_comes_out_upright(tmp_path):
    from transfer_cli.data.image_decode import open_image

    stored = np.zeros((10, 20, 3), dtype=np.uint8)  # 20 wide, 10 high: left half red, right half blue
    stored[:, :10] = (255, 0, 0)
    stored[:, 10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; show the stored pixels rotated 90° clockwise
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = np.asarray(open_image(tmp_path / "photo.jpg", "RGB")).astype(int)
    assert upright.shape == (20, 10, 3)  # portrait, as the camera held it
    assert upright[2, 5, 0] > 200 > upright[2, 5, 2]  # the stored left (red) is now the top
    assert upright[17, 5, 2] > 200 > upright[17, 5, 0]


def mixed_mode_images(root: Path) -> Path:
    """An image folder whose files come in every mode a photo collection holds."""
    image_tree(root)
    folder = root / "train" / "a"
    Image.new("RGBA", (10, 10), (200, 30, 30, 128)).save(folder / "rgba.png")
    Image.new("L", (10, 10), 120).save(folder / "grey.png")
    Image.fromarray(np.full((10, 10), 40000, dtype=np.uint16)).save(folder / "grey16.png")
    Image.new("CMYK", (10, 10), (0, 200, 200, 0)).save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (14, 10), (200, 30, 30)).save(folder / "rotated.jpg", exif=exif)
    return root


def test_a_folder_of_mixed_image_modes_trains(tmp_path):
    root = mixed_mode_images(tmp_path / "images")
    run_dir = tmp_path / "run"
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", "data=imagefolder", f"data.root={root}",
          "data.num_workers=0", "data.augment=false"])
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 2


def test_skip_bad_images_leaves_them_out_names_each_once_and_counts_them(tmp_path, capsys):
    root = image_tree(tmp_path / "images")
    truncated_jpeg(root / "train" / "a")
    write(root / "test" / "b" / "empty.png", b"")
    run_dir = tmp_path / "run"
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", "data=imagefolder", f"data.root={root}",
          "data.num_workers=0", "data.augment=false", "data.skip_bad_images=true"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["skipped_images"]["count"] == 2
    assert [Path(p).name for p in results["skipped_images"]["train"]] == ["cut.jpg"]
    assert [Path(p).name for p in results["skipped_images"]["test"]] == ["empty.png"]
    assert results["test"]["n"] == 2  # the 0-byte file is not counted as a test example
    err = capsys.readouterr().err
    assert err.count("skipped unreadable image") == 2 and err.count("cut.jpg") == 1  # two epochs, said once


def test_a_batch_larger_than_the_data_is_one_batch_of_all_of_it(tmp_path):
    """The quickstart depends on this (30 examples, trainer.batch_size=32): each epoch is one step."""
    run_dir = tmp_path / "run"
    main(["train", *SMOKE, f"hydra.run.dir={run_dir}", "trainer.batch_size=1000", "trainer.max_train_batches=null"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["steps"] == results["epochs"] == 2
