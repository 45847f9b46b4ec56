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
    return apply_subsets(
        bundle,
        classes=classes,
        train_fraction=cfg.train_fraction,
        samples_per_class=cfg.samples_per_class,
        seed=seed,
    )
