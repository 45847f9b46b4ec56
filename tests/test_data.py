"""The data layer: sources, subset options and loaders, on real (tiny or bundled) data."""
from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import transfer_cli
from transfer_cli.cli import main
from transfer_cli.data import DATASETS, ImageArraySplit, ImageFileSplit, TextSplit, build_data, make_loader
from transfer_cli.data import tensor_batches
from transfer_cli.data.sampling import stratified_split
from transfer_cli.errors import TransferCliError

CONFIGS = Path(transfer_cli.__file__).parent / "configs" / "data"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def data_cfg(name: str, **overrides):
    """The shipped config for `name` with overrides; struct mode, so a misspelt key fails as in Hydra."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    OmegaConf.set_struct(cfg, True)
    return OmegaConf.merge(cfg, overrides)


def image_model(size=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation="bilinear"):
    prep = {"input_size": size, "mean": mean, "std": std, "interpolation": interpolation, "crop_pct": 1.0}
    return SimpleNamespace(modality="image", preprocessing=prep)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    from transformers import BertTokenizerFast

    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    words = "good bad movie great awful plot the a was very".split()
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return SimpleNamespace(modality="text", preprocessing={"tokenizer": BertTokenizerFast(vocab_file=str(vocab))})


def counts(labels: torch.Tensor, n: int) -> list[int]:
    return torch.bincount(labels, minlength=n).tolist()


# ---- digits --------------------------------------------------------------------------------------
def test_digits_read_without_scikit_learn_are_scikit_learns_digits():
    from sklearn.datasets import load_digits

    from transfer_cli.data.digits import digits

    bundle = digits(data_cfg("digits", samples_per_class=None, val_fraction=0.0, test_fraction=0.0))
    raw = load_digits()
    assert torch.equal(bundle.train.images[:, 0], torch.from_numpy(np.rint(raw.images * 255 / 16).astype(np.uint8)))
    assert torch.equal(bundle.train.labels, torch.from_numpy(raw.target).long())
    assert bundle.class_names == tuple(str(c) for c in raw.target_names)


def test_digits_shapes_and_test_split_fixed_across_run_seeds():
    a = build_data(data_cfg("digits", samples_per_class=None), seed=0)
    b = build_data(data_cfg("digits", samples_per_class=None), seed=1)
    assert a.class_names == tuple("0123456789")
    assert a.train.images.dtype == torch.uint8 and a.train.images.shape[1:] == (1, 8, 8)
    assert int(a.train.images.max()) == 255
    sizes = [len(s.labels) for s in (a.train, a.val, a.test)]
    assert sum(sizes) == 1797
    assert abs(sizes[2] - 0.3 * 1797) < 10 and abs(sizes[1] - 0.2 * (1797 - sizes[2])) < 10
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.val.labels, b.val.labels)
    other = build_data(data_cfg("digits", samples_per_class=None, split_seed=1), seed=0)
    assert not torch.equal(a.test.images, other.test.images)


def test_stratified_split_keeps_class_proportions_and_singletons():
    labels = torch.tensor([0] * 50 + [1] * 10 + [2])
    rest, taken = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert counts(labels[taken], 3) == [10, 2, 0] and counts(labels[rest], 3) == [40, 8, 1]
    assert sorted(torch.cat([rest, taken]).tolist()) == list(range(61))
    again, _ = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert torch.equal(rest, again)


# ---- subset options -----------------------------------------------------------------------------
def test_classes_subset_relabels_in_given_order():
    full = build_data(data_cfg("digits", samples_per_class=None), seed=0)
    sub = build_data(data_cfg("digits", samples_per_class=None, classes=[7, "3"]), seed=0)
    assert sub.class_names == ("7", "3")
    for name in ("train", "val", "test"):
        before, after = getattr(full, name), getattr(sub, name)
        assert set(after.labels.tolist()) == {0, 1}
        assert torch.equal(after.images[after.labels == 0], before.images[before.labels == 7])
        assert torch.equal(after.images[after.labels == 1], before.images[before.labels == 3])


def test_unknown_class_lists_valid_names():
    with pytest.raises(TransferCliError, match=r"no class 'eleven'.*0, 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        build_data(data_cfg("digits", classes=["eleven"]), seed=0)


def test_samples_per_class_exact_seeded_and_nested():
    def draw(k, seed):
        return build_data(data_cfg("digits", samples_per_class=k), seed=seed)

    five, again, other, two = draw(5, 0), draw(5, 0), draw(5, 1), draw(2, 0)
    assert counts(five.train.labels, 10) == [5] * 10
    assert torch.equal(five.train.images, again.train.images)
    assert not torch.equal(five.train.images, other.train.images)
    assert torch.equal(five.test.images, other.test.images) and len(five.val.labels) == len(other.val.labels)
    flat = {bytes(img.numpy()) for img in five.train.images}
    assert all(bytes(img.numpy()) in flat for img in two.train.images)


def test_samples_per_class_too_many_names_the_class():
    with pytest.raises(TransferCliError, match=r"class '0' has \d+ training examples, fewer than data.samples_per_class=500"):
        build_data(data_cfg("digits", samples_per_class=500), seed=0)


def test_train_fraction_is_stratified_and_leaves_val_test():
    full = build_data(data_cfg("digits", samples_per_class=None), seed=0)
    part = build_data(data_cfg("digits", samples_per_class=None, train_fraction=0.25), seed=0)
    for have, had in zip(counts(part.train.labels, 10), counts(full.train.labels, 10)):
        assert abs(have - 0.25 * had) <= 1
    assert torch.equal(part.test.labels, full.test.labels) and torch.equal(part.val.labels, full.val.labels)


# ---- fashion-mnist ------------------------------------------------------------------------------
def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray, gz: bool) -> None:
    def idx(array: np.ndarray) -> bytes:
        return bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes() + array.tobytes()

    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        path = folder / f"{prefix}-{kind}"
        if gz:
            path.with_name(path.name + ".gz").write_bytes(gzip.compress(idx(array)))
        else:
            path.write_bytes(idx(array))


def tiny_idx_root(folder: Path, gz: bool) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 4)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder, "train", images, labels, gz)
    write_idx(folder, "t10k", images[:20], labels[:20], gz)
    return images, labels


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST files not installed")
def test_fashion_mnist_real_files():
    bundle = build_data(data_cfg("fashion_mnist"), seed=0)
    assert bundle.class_names[0] == "T-shirt/top" and bundle.class_names[9] == "Ankle boot"
    assert len(bundle.train.labels) == 54_000 and len(bundle.val.labels) == 6_000 and len(bundle.test.labels) == 10_000
    assert bundle.test.images.shape == (10_000, 1, 28, 28) and bundle.test.images.dtype == torch.uint8
    assert counts(bundle.test.labels, 10) == [1000] * 10


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_gzipped_or_not(tmp_path, gz):
    images, labels = tiny_idx_root(tmp_path, gz)
    bundle = build_data(data_cfg("fashion_mnist", root=str(tmp_path), val_fraction=0.25), seed=0)
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(images[:20]))
    assert torch.equal(bundle.test.labels, torch.from_numpy(labels[:20]).long())
    assert len(bundle.train.labels) == 30 and counts(bundle.val.labels, 10) == [1] * 10


def test_fashion_mnist_missing_and_truncated_files(tmp_path):
    with pytest.raises(TransferCliError, match="does not exist; set data.root="):
        build_data(data_cfg("fashion_mnist", root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(TransferCliError, match="train-images-idx3-ubyte .* not found"):
        build_data(data_cfg("fashion_mnist", root=str(tmp_path)), seed=0)
    tiny_idx_root(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(TransferCliError, match="truncated or corrupt"):
        build_data(data_cfg("fashion_mnist", root=str(tmp_path)), seed=0)


# ---- imagefolder --------------------------------------------------------------------------------
def make_images(folder: Path, per_class: dict[str, int], size=(12, 10)) -> None:
    for name, n in per_class.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (20 * i, 100, 200)).save(folder / name / f"{i}.png")


def test_imagefolder_carves_val_and_test(tmp_path):
    make_images(tmp_path, {"cat": 10, "dog": 10, "eel": 5})
    bundle = build_data(data_cfg("imagefolder", root=str(tmp_path), val_fraction=0.2, test_fraction=0.2), seed=0)
    assert bundle.class_names == ("cat", "dog", "eel")
    assert isinstance(bundle.train, ImageFileSplit)
    assert counts(bundle.test.labels, 3) == [2, 2, 1] and counts(bundle.val.labels, 3) == [2, 2, 1]
    every = bundle.train.paths + bundle.val.paths + bundle.test.paths
    assert len(set(every)) == 25


def test_imagefolder_train_val_test_layout(tmp_path):
    make_images(tmp_path / "train", {"a": 3, "b": 3})
    make_images(tmp_path / "val", {"a": 1, "b": 1})
    make_images(tmp_path / "test", {"b": 2})
    bundle = build_data(data_cfg("imagefolder", root=str(tmp_path)), seed=0)
    assert len(bundle.train.paths) == 6 and len(bundle.val.paths) == 2
    assert bundle.test.labels.tolist() == [1, 1] and bundle.test.paths[0].parent.name == "b"


def test_imagefolder_errors(tmp_path):
    with pytest.raises(TransferCliError, match=r"data folder .*nope does not exist; set data.root="):
        build_data(data_cfg("imagefolder", root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(TransferCliError, match="no class folders"):
        build_data(data_cfg("imagefolder", root=str(tmp_path)), seed=0)
    make_images(tmp_path, {"a": 2})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(TransferCliError, match="class folder .*empty_class has no images"):
        build_data(data_cfg("imagefolder", root=str(tmp_path)), seed=0)
    with pytest.raises(TransferCliError, match="needs data.root"):
        build_data(data_cfg("imagefolder"), seed=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_is_one_line_error(tmp_path, workers):
    make_images(tmp_path, {"a": 2})
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    split = ImageFileSplit(tuple(sorted((tmp_path / "a").iterdir())), torch.zeros(3, dtype=torch.long))
    loader = make_loader(split, image_model(), 2, train=False, seed=0, num_workers=workers)
    with pytest.raises(TransferCliError) as error:
        list(loader)
    assert "broken.png" in str(error.value) and "\n" not in str(error.value)


def test_file_loader_batches_and_repeatable_augmentation(tmp_path):
    make_images(tmp_path, {"a": 3, "b": 2}, size=(20, 14))
    bundle = build_data(data_cfg("imagefolder", root=str(tmp_path), val_fraction=0, test_fraction=0), seed=0)
    model = image_model(size=(3, 16, 16))
    batches = list(make_loader(bundle.train, model, 2, train=False, seed=0))
    assert [b["pixel_values"].shape for b in batches] == [(2, 3, 16, 16)] * 2 + [(1, 3, 16, 16)]
    assert torch.cat([b["labels"] for b in batches]).tolist() == [0, 0, 0, 1, 1]

    def epoch(loader, e):
        loader.set_epoch(e)
        return torch.cat([b["pixel_values"] for b in loader])

    first = make_loader(bundle.train, model, 2, train=True, augment=True, seed=3)
    second = make_loader(bundle.train, model, 2, train=True, augment=True, seed=3)
    assert torch.equal(epoch(first, 1), epoch(second, 1))
    assert not torch.equal(epoch(first, 1), epoch(first, 2))


# ---- text ---------------------------------------------------------------------------------------
def test_csv_and_jsonl_share_one_label_mapping(tmp_path):
    (tmp_path / "train.csv").write_text("review,sentiment\ngood movie,pos\nawful plot,neg\ngreat,pos\nbad,neg\n")
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"review": "very good", "sentiment": "pos"}) + "\n\n" + json.dumps({"review": "bad", "sentiment": "neg"}) + "\n"
    )
    cfg = data_cfg("csv_text", train_file=str(tmp_path / "train.csv"), test_file=str(tmp_path / "test.jsonl"),
                   text_column="review", label_column="sentiment", val_fraction=0.5)
    bundle = build_data(cfg, seed=0)
    assert bundle.class_names == ("neg", "pos")
    assert bundle.test.texts == ("very good", "bad") and bundle.test.labels.tolist() == [1, 0]
    assert isinstance(bundle.train, TextSplit) and len(bundle.train.texts) == 2 and len(bundle.val.texts) == 2
    assert sorted(bundle.train.labels.tolist()) == [0, 1]


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate([10, 2, 1, 2, 10, 1])]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    bundle = build_data(data_cfg("csv_text", train_file=str(tmp_path / "train.jsonl"), val_fraction=0, test_fraction=0), seed=0)
    assert bundle.class_names == ("1", "2", "10") and bundle.train.labels.tolist() == [2, 1, 0, 1, 2, 0]


def test_text_file_errors(tmp_path):
    with pytest.raises(TransferCliError, match="does not exist; set data.train_file="):
        build_data(data_cfg("csv_text", train_file=str(tmp_path / "missing.csv")), seed=0)
    (tmp_path / "train.csv").write_text("body,label\nhello,a\n")
    with pytest.raises(TransferCliError, match=r"column 'text' not in .*columns: body, label\); set data.text_column="):
        build_data(data_cfg("csv_text", train_file=str(tmp_path / "train.csv")), seed=0)
    (tmp_path / "gap.csv").write_text("text,label\nhello,a\nworld,\n")
    with pytest.raises(TransferCliError, match="example 2 of .*gap.csv has no usable label"):
        build_data(data_cfg("csv_text", train_file=str(tmp_path / "gap.csv")), seed=0)


def test_hf_dataset_from_local_csv(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"x{i},{'ab'[i % 2]}\n" for i in range(10)))
    cfg = data_cfg("hf_dataset", path="csv", data_files={"train": str(tmp_path / "train.csv")}, test_split=None)
    bundle = build_data(cfg, seed=0)
    assert bundle.class_names == ("a", "b")
    assert len(bundle.train.texts) + len(bundle.val.texts) + len(bundle.test.texts) == 10
    with pytest.raises(TransferCliError, match=r"no split 'test' \(it has: train\); set data.test_split"):
        build_data(data_cfg("hf_dataset", path="csv", data_files=str(tmp_path / "train.csv")), seed=0)


# ---- torchvision --------------------------------------------------------------------------------
def test_torchvision_errors(tmp_path):
    with pytest.raises(TransferCliError, match="no dataset 'NotADataset'"):
        build_data(data_cfg("torchvision", dataset="NotADataset", root=str(tmp_path)), seed=0)
    with pytest.raises(TransferCliError, match="set data.root .* or data.download=true"):
        build_data(data_cfg("torchvision", root=str(tmp_path / "nope")), seed=0)
    with pytest.raises(TransferCliError, match="CIFAR10 not loaded .*; set data.download=true or data.root"):
        build_data(data_cfg("torchvision", root=str(tmp_path)), seed=0)


def test_torchvision_in_memory_dataset_becomes_array_split(tmp_path):
    images, labels = tiny_idx_root(tmp_path / "FashionMNIST" / "raw", gz=False)
    bundle = build_data(data_cfg("torchvision", dataset="FashionMNIST", root=str(tmp_path), val_fraction=0.25), seed=0)
    assert isinstance(bundle.test, ImageArraySplit) and bundle.test.images.shape == (20, 1, 28, 28)
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(images[:20]))
    assert bundle.class_names[9] == "Ankle boot" and len(bundle.train.labels) == 30


# ---- in-memory loaders --------------------------------------------------------------------------
def array_split(n=10, size=8):
    images = torch.arange(n * size * size, dtype=torch.int64).remainder(256).to(torch.uint8).view(n, 1, size, size)
    return ImageArraySplit(images, torch.arange(n) % 3)


def test_image_array_batches_and_normalisation():
    split = array_split()
    loader = make_loader(split, image_model(), 4, train=False, seed=0)
    batches = list(loader)
    assert len(loader) == 3 and loader.num_samples == 10
    assert [b["pixel_values"].shape[0] for b in batches] == [4, 4, 2]
    first = batches[0]["pixel_values"]
    assert first.dtype == torch.float32 and first.shape == (4, 3, 8, 8)
    assert batches[0]["labels"].dtype == torch.long and batches[0]["labels"].tolist() == [0, 1, 2, 0]
    value = int(split.images[1, 0, 2, 3])  # 51
    expected = (value / 255 - 0.5) / 0.25
    assert all(first[1, c, 2, 3].item() == pytest.approx(expected, abs=1e-6) for c in range(3))


def test_resize_up_front_equals_resize_per_batch(monkeypatch):
    split = array_split(n=6, size=8)
    model = image_model(size=(1, 20, 20), mean=(0.0,), std=(1.0,), interpolation="bicubic")
    up_front = torch.cat([b["pixel_values"] for b in make_loader(split, model, 4, train=False, seed=0)])
    monkeypatch.setattr(tensor_batches, "PRERESIZE_BYTES", 0)
    per_batch = torch.cat([b["pixel_values"] for b in make_loader(split, model, 4, train=False, seed=0)])
    assert up_front.shape == (6, 1, 20, 20) and torch.equal(up_front, per_batch)
    flat = ImageArraySplit(torch.full((2, 1, 8, 8), 51, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    resized = next(iter(make_loader(flat, model, 2, train=False, seed=0)))["pixel_values"]
    assert torch.allclose(resized, torch.full_like(resized, 0.2))


def test_epoch_order_is_a_function_of_seed_and_epoch():
    split = ImageArraySplit(torch.zeros(50, 1, 2, 2, dtype=torch.uint8), torch.arange(50))
    model = image_model(size=(1, 2, 2), mean=(0.0,), std=(1.0,))

    def order(seed, epoch):
        loader = make_loader(split, model, 8, train=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([b["labels"] for b in loader]).tolist()

    assert order(0, 3) == order(0, 3)
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)
    assert sorted(order(0, 3)) == list(range(50))
    evaluation = make_loader(split, model, 8, train=False, seed=0)
    evaluation.set_epoch(5)
    assert torch.cat([b["labels"] for b in evaluation]).tolist() == list(range(50))


def test_text_batches_trim_padding(text_model):
    split = TextSplit(("good", "the movie was very very good", "bad plot", "great"), torch.tensor([1, 1, 0, 1]))
    batches = list(make_loader(split, text_model, 2, train=False, seed=0, max_length=16))
    first, second = batches
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert first["input_ids"].shape == (2, 8)  # [CLS] + 6 words + [SEP]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8]
    assert second["input_ids"].shape == (2, 4) and second["labels"].tolist() == [0, 1]
    short = list(make_loader(split, text_model, 4, train=False, seed=0, max_length=5))[0]
    assert short["input_ids"].shape == (4, 5)


def test_modality_mismatch(text_model):
    with pytest.raises(TransferCliError, match="the data holds images but the backbone is a text model"):
        make_loader(array_split(), text_model, 4, train=False, seed=0)


def test_every_source_has_a_summary():
    assert set(DATASETS.names()) >= {"digits", "fashion_mnist", "imagefolder", "torchvision", "csv_text", "hf_dataset"}
    assert all(DATASETS.summary(name) for name in DATASETS.names())


def test_a_training_pass_never_ends_on_a_single_example_batch(tmp_path):
    """BatchNorm cannot train on one example: training folds it into the batch before; evaluation keeps it."""
    split = array_split(n=9)
    train = make_loader(split, image_model(), 4, train=True, seed=0)
    assert len(train) == 2 and [len(b["labels"]) for b in train] == [4, 5]
    assert sorted(torch.cat([b["labels"] for b in train]).tolist()) == sorted(split.labels.tolist())
    evaluation = make_loader(split, image_model(), 4, train=False, seed=0)
    assert len(evaluation) == 3 and [len(b["labels"]) for b in evaluation] == [4, 4, 1]

    make_images(tmp_path, {"a": 3, "b": 2}, size=(20, 14))
    bundle = build_data(data_cfg("imagefolder", root=str(tmp_path), val_fraction=0, test_fraction=0), seed=0)
    files = make_loader(bundle.train, image_model(size=(3, 16, 16)), 2, train=True, seed=0)
    assert len(files) == 2 and [len(b["labels"]) for b in files] == [2, 3]
    assert sorted(torch.cat([b["labels"] for b in files]).tolist()) == [0, 0, 0, 1, 1]


# ---- in-memory augmentation ---------------------------------------------------------------------
def ramps(n: int, height: int = 32, width: int = 32) -> ImageArraySplit:
    """Channel 0 rises left to right, channel 1 top to bottom (8 per pixel): a crop and flip can be read off."""
    x = torch.arange(width).mul(8).expand(height, width)
    y = torch.arange(height).mul(8)[:, None].expand(height, width)
    image = torch.stack([x, y, torch.zeros_like(x)]).to(torch.uint8)
    return ImageArraySplit(image.expand(n, -1, -1, -1).clone(), torch.arange(n))


def indexed(n: int) -> ImageArraySplit:
    """array_split's images labelled by their index, so that by_example can put them back in order."""
    return ImageArraySplit(array_split(n).images, torch.arange(n))


def by_example(loader, epoch: int = 0) -> torch.Tensor:
    """One epoch's images put back in stored order (labels are the example indices)."""
    loader.set_epoch(epoch)
    batches = list(loader)
    images = torch.cat([b["pixel_values"] for b in batches])
    return images[torch.cat([b["labels"] for b in batches]).argsort()]


def crop_geometry(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed width (negative: flipped) and height of each crop as fractions of the ramp image's."""
    pixels = images * 255 / 8  # unnormalised (mean 0, std 1), in source pixels
    width = (pixels[:, 0, :, -1] - pixels[:, 0, :, 0]).mean(-1) / (images.shape[-1] - 1)
    height = (pixels[:, 1, -1, :] - pixels[:, 1, 0, :]).mean(-1) / (images.shape[-2] - 1)
    return width, height


def plain(size=(3, 32, 32)):
    return image_model(size=size, mean=(0.0,) * 3, std=(1.0,) * 3)


def test_array_augmentation_changes_training_images_within_the_normalised_range():
    split = indexed(12)
    train = make_loader(split, image_model(size=(3, 16, 16)), 5, train=True, seed=0, augment=True)
    assert train.augment
    augmented = by_example(train)
    clean = by_example(make_loader(split, image_model(size=(3, 16, 16)), 5, train=True, seed=0))
    assert augmented.shape == clean.shape == (12, 3, 16, 16) and augmented.dtype == torch.float32
    assert not torch.equal(augmented, clean)
    # bilinear samples mix pixels of the image: they stay in the range of (0..255 / 255 - 0.5) / 0.25
    assert augmented.min() >= -2 - 1e-5 and augmented.max() <= 2 + 1e-5


def test_array_augmentation_is_a_function_of_seed_epoch_and_example():
    split = indexed(23)
    model = image_model(size=(3, 12, 12))

    def epoch(batch_size, e, seed=0):
        return by_example(make_loader(split, model, batch_size, train=True, seed=seed, augment=True), e)

    assert torch.equal(epoch(4, 1), epoch(4, 1))  # a resumed run redraws the same augmentation
    assert not torch.equal(epoch(4, 1), epoch(4, 2)) and not torch.equal(epoch(4, 1, seed=1), epoch(4, 1))
    # the same example gets the same augmentation whatever the batch it lands in, and whatever the shard
    assert torch.equal(epoch(4, 1), epoch(7, 1)) and torch.equal(epoch(4, 1), epoch(23, 1))
    shares = []
    for rank in range(2):
        loader = make_loader(split, model, 3, train=True, seed=0, augment=True)
        loader.shard(rank, 2, even=False)
        loader.set_epoch(1)
        shares += list(loader)
    sharded = torch.cat([b["pixel_values"] for b in shares])[torch.cat([b["labels"] for b in shares]).argsort()]
    assert torch.equal(sharded, epoch(4, 1))


def test_evaluation_and_unaugmented_loaders_serve_the_plain_images():
    split = indexed(10)
    model = image_model(size=(3, 16, 16))
    evaluation = make_loader(split, model, 4, train=False, seed=0, augment=True)
    assert not evaluation.augment
    reference = torch.cat([b["pixel_values"] for b in make_loader(split, model, 4, train=False, seed=0)])
    assert torch.equal(torch.cat([b["pixel_values"] for b in evaluation]), reference)
    plain_train = make_loader(split, model, 3, train=True, seed=0)
    assert not plain_train.augment and torch.equal(by_example(plain_train, 2), reference)


def test_array_crops_and_flips_follow_timms_random_resized_crop():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    width, height = crop_geometry(by_example(make_loader(ramps(1000), plain(), 250, train=True, seed=0,
                                                         augment=True)))
    assert 0.4 < (width < 0).float().mean() < 0.6  # flipped with probability 0.5
    area, ratio = width.abs() * height, width.abs() / height
    assert area.min() > 0.08 - 0.02 and area.max() <= 1 + 1e-4
    assert ratio.min() > 0.75 - 0.05 and ratio.max() < 4 / 3 + 0.05
    # timm's crops of a large image, as fractions of it: the same distribution of areas and ratios
    random.seed(0)
    big = Image.new("L", (1000, 1000))
    crops = torch.tensor([RandomResizedCropAndInterpolation.get_params(big, (0.08, 1.0), (3 / 4, 4 / 3))[2:]
                          for _ in range(5000)], dtype=torch.float64) / 1000
    assert abs(area.mean() - crops.prod(1).mean()) < 0.03
    assert abs(ratio.log().std() - (crops[:, 1] / crops[:, 0]).log().std()) < 0.02


def test_array_crop_aspect_ratio_is_the_source_images():
    """A wide image keeps crop ratios (in its own pixels) within 3/4..4/3, as timm's crop of it would."""
    width, height = crop_geometry(by_example(make_loader(ramps(300, 16, 32), plain((3, 16, 32)), 100,
                                                         train=True, seed=0, augment=True)))
    ratio = width.abs() * 32 / (height * 16)
    assert ratio.min() > 0.75 - 0.08 and ratio.max() < 4 / 3 + 0.1


def test_text_with_augment_is_a_one_line_error(text_model, tiny_bert, tmp_path, capsys):
    split = TextSplit(("good", "bad"), torch.tensor([1, 0]))
    with pytest.raises(TransferCliError, match="text data has no augmentation here; set data.augment=false"):
        make_loader(split, text_model, 2, train=True, seed=0, augment=True)
    csv = tmp_path / "train.csv"
    csv.write_text("text,label\n" + "".join(f"good movie {i},pos\nbad plot {i},neg\n" for i in range(6)))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "trainer=smoke", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'run'}", "backbone=hf",
              f"backbone.weights={tiny_bert}", "data=csv_text", f"data.train_file={csv}", "data.augment=true"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "set data.augment=false" in err


def test_feature_cache_refuses_augmented_arrays(tmp_path, capsys):
    args = ["train", "trainer=smoke", "trainer.device=cpu", "strategy=freeze", "data.augment=true"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "strategy.cache_features=true", f"hydra.run.dir={tmp_path / 'required'}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert "strategy.cache_features=true, but data.augment=true" in err
    main([*args, f"hydra.run.dir={tmp_path / 'auto'}"])  # auto trains without the cache
    assert (tmp_path / "auto" / "results.json").exists()
