"""data=hf_dataset with image classification datasets, built offline: the `imagefolder` builder and a
parquet file, decoded with the backbone's transforms exactly as image files are."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from transfer_cli.cli import main
from transfer_cli.config_files import CONFIG_DIR
from transfer_cli.data import EncodedImageSplit, build_data, make_loader
from transfer_cli.errors import TransferCliError

datasets = pytest.importorskip("datasets")

CLASSES = ("ant", "bee", "cat")


def data_cfg(name: str, **overrides):
    cfg = OmegaConf.load(CONFIG_DIR / "data" / f"{name}.yaml")
    OmegaConf.set_struct(cfg, True)
    return OmegaConf.merge(cfg, overrides)


def model_prep():
    from types import SimpleNamespace

    prep = {"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3, "interpolation": "bilinear",
            "crop_pct": 0.875}
    return SimpleNamespace(modality="image", preprocessing=prep)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/<class>/ with 6 images per class and test/<class>/ with 2, of varied sizes."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (12 + i, 20 - i, 3), dtype=np.uint8)
                pixels[..., c] = 255  # a class colour, so that a model can learn it
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def batches(split, model, train=False):
    return list(make_loader(split, model, 4, train=train, seed=0))


def test_imagefolder_builder_gives_the_classes_splits_and_the_image_files_pixels(folder):
    bundle = build_data(data_cfg("hf_dataset", path="imagefolder", data_dir=str(folder)), seed=0)
    assert bundle.class_names == CLASSES
    assert isinstance(bundle.train, EncodedImageSplit)
    assert len(bundle.test) == 6 and len(bundle.train) + len(bundle.val) == 18
    files = build_data(data_cfg("imagefolder", root=str(folder)), seed=0)
    # the same files through data=imagefolder: same test split order and labels, identical batches
    assert torch.equal(files.test.labels, bundle.test.labels)
    model = model_prep()
    for ours, theirs in zip(batches(bundle.test, model), batches(files.test, model)):
        assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
        assert torch.equal(ours["labels"], theirs["labels"])


def test_subset_options_apply_to_image_datasets(folder):
    cfg = data_cfg("hf_dataset", path="imagefolder", data_dir=str(folder), samples_per_class=2,
                   classes=["cat", "ant"], val_fraction=0.25)
    bundle = build_data(cfg, seed=1)
    assert bundle.class_names == ("cat", "ant")
    assert torch.bincount(bundle.train.labels).tolist() == [2, 2]
    assert torch.bincount(bundle.test.labels).tolist() == [2, 2]
    other_seed = build_data(cfg, seed=2)
    assert bundle.train.rows != other_seed.train.rows  # each seed a different few-shot draw
    assert bundle.val.rows == other_seed.val.rows  # validation fixed by data.split_seed


def test_a_parquet_file_with_string_labels_carves_val_and_test(folder, tmp_path):
    table = datasets.load_dataset("imagefolder", data_dir=str(folder))["train"]
    names = table.features["label"].names
    table = table.map(lambda row: {"species": names[row["label"]]}).remove_columns("label")
    table.to_parquet(str(tmp_path / "train.parquet"))
    cfg = data_cfg("hf_dataset", path="parquet", data_files={"train": str(tmp_path / "train.parquet")},
                   label_column="species", test_split=None, test_fraction=0.5, val_fraction=0.0)
    bundle = build_data(cfg, seed=0)
    assert bundle.class_names == CLASSES  # collected from the values, sorted
    assert torch.bincount(bundle.test.labels).tolist() == [3, 3, 3]
    shapes = {tuple(b["pixel_values"].shape[1:]) for b in batches(bundle.train, model_prep(), train=True)}
    assert shapes == {(3, 16, 16)}


def test_an_undecodable_image_is_one_line_naming_it(folder, tmp_path):
    broken = tmp_path / "broken"
    for name in CLASSES:
        (broken / "train" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(broken / "train" / name / f"{i}.png")
    (broken / "train" / "bee" / "1.png").write_bytes(b"not a png")
    bundle = build_data(data_cfg("hf_dataset", path="imagefolder", data_dir=str(broken), test_split=None,
                                 test_fraction=0.0, val_fraction=0.0), seed=0)
    with pytest.raises(TransferCliError, match=r"cannot read image .*1\.png.*fix or remove the file"):
        batches(bundle.train, model_prep())


@pytest.mark.slow
def test_train_on_an_image_dataset_from_the_command_line(folder, tmp_path):
    run = tmp_path / "run"
    main(["train", "trainer=smoke", "trainer.device=cpu", "data=hf_dataset", "data.path=imagefolder",
          f"data.data_dir={folder}", "data.augment=true", f"hydra.run.dir={run}"])
    results = json.loads((run / "results.json").read_text())
    assert results["class_names"] == list(CLASSES)
    assert results["test"]["n"] == 6 and len(results["test"]["confusion"]) == 3
