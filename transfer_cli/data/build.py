"""cfg.data -> DataBundle: load the named source, then apply the subset options with the run seed."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from transfer_cli.data.common import DATASETS
from transfer_cli.data.splits import DataBundle
from transfer_cli.data.subsets import apply_subsets
from transfer_cli.errors import TransferCliError


def build_data(cfg: DictConfig, seed: int) -> DataBundle:
    """The splits of `cfg.name` (the `data` config node); `seed` is the run seed for the few-shot draws."""
    missing = [key for key in cfg if OmegaConf.is_missing(cfg, key)]  # names within `data`
    if missing:
        key = missing[0]
        raise TransferCliError(f"data={cfg.name} needs data.{key}; add data.{key}=... to the command")
    bundle = DATASETS.get(cfg.name)(cfg)
    classes = OmegaConf.to_container(cfg.classes) if OmegaConf.is_config(cfg.classes) else cfg.classes
    bundle = apply_subsets(
        bundle,
        classes=classes,
        train_fraction=cfg.train_fraction,
        samples_per_class=cfg.samples_per_class,
        seed=seed,
    )
    check_classes(bundle, cfg)
    return bundle


def check_classes(bundle: DataBundle, cfg: DictConfig) -> None:
    """Every class that is evaluated was trained on, and a carved split holds every class: a class left
    out of validation is never part of choosing the best epoch, one left out of test is never measured."""
    trained = set(bundle.train.labels.tolist())
    for split in ("val", "test"):
        labels = getattr(bundle, split).labels
        unseen = sorted(set(labels.tolist()) - trained)
        if unseen:
            name, count = bundle.class_names[unseen[0]], int((labels == unseen[0]).sum())
            raise TransferCliError(
                f"the {split} split has class {name!r} ({count} example(s)) that no training example has, so the "
                f"model cannot learn it; add training examples of it, or leave it out with data.classes"
            )
    need = 1 + len(bundle.carved)
    for split in bundle.carved:
        labels = getattr(bundle, split).labels
        absent = sorted(trained - set(labels.tolist())) if len(labels) else []
        if absent:
            name = bundle.class_names[absent[0]]
            total = sum(int((getattr(bundle, s).labels == absent[0]).sum()) for s in ("train", *bundle.carved))
            raise TransferCliError(
                f"class {name!r} has {total} example(s) to carve from, too few to carve the {split} split with it "
                f"in (data.{split}_fraction={cfg[f'{split}_fraction']}): it needs at least {need} (one for training, "
                f"one for each carved split); add examples of it, or leave it out with data.classes"
            )
