"""Transfer strategies, one module each, registered by their config name."""
from omegaconf import DictConfig

from transfer_cli.strategies import (  # noqa: F401  (registration)
    adafilter, bss, chain_thaw, delta, finetune, freeze, gradual_unfreeze, l2sp, scratch, sequential_unfreeze,
    spottune, transtailor)
from transfer_cli.strategies import peft  # noqa: F401,E402  (registration: lora, adapter, bitfit, vpt, ssf)
from transfer_cli.strategies.base import STRATEGIES, Strategy


def build_strategy(cfg: DictConfig) -> Strategy:
    """The strategy named by `cfg.strategy.name`, with its own config node and the optimizer's."""
    return STRATEGIES.get(cfg.strategy.name)(cfg.strategy, cfg.optim)
