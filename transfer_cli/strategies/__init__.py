"""Transfer strategies, grouped by family, registered by their config name (`strategy=<name>`).

Families: baselines (finetune, scratch), schedules/ (what trains when), regularizers/ (terms added to
the loss, which any strategy can hold), routing/ (per-example frozen or fine-tuned paths), pruning/,
peft/ (parameter-efficient: a few new parameters beside a frozen body), continual/ (class-incremental
methods: SimpleCIL, APER, EWC, the continual LwF).
"""
from omegaconf import DictConfig

from transfer_cli.errors import TransferCliError
from transfer_cli.strategies import baselines, peft  # noqa: F401  (registration)
from transfer_cli.strategies.base import STRATEGIES, Strategy
from transfer_cli.strategies.continual import cil_lwf, ewc, prototypes  # noqa: F401
from transfer_cli.strategies.pruning import transtailor  # noqa: F401
from transfer_cli.strategies.regularizers import (bi_tuning, bss, co_tuning, delta, flat, hybrid_forward,  # noqa: F401
                                                  l2sp, l2t_ww, lwf, stochnorm)
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer
from transfer_cli.strategies.routing import adafilter, spottune  # noqa: F401
from transfer_cli.strategies.schedules import chain_thaw, freeze, gradual_unfreeze, sequential_unfreeze  # noqa: F401


def build_strategy(cfg: DictConfig) -> Strategy:
    """The strategy named by `cfg.strategy.name` with its own config node, the optimizer's, and its
    regularizer terms: the ones the strategy is made of (strategy=l2sp) and those `cfg.regularizers` lists."""
    factory = STRATEGIES.get(cfg.strategy.name)
    terms = factory.own_regularizers(cfg.strategy) + build_regularizers(cfg.get("regularizers") or {})
    names = [t.name for t in terms]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise TransferCliError(f"regularizer {repeated[0]} is given twice (strategy={cfg.strategy.name} already "
                               f"holds it); drop it from regularizers=[...]")
    return factory(cfg.strategy, cfg.optim, terms)


def build_regularizers(nodes: DictConfig) -> list[Regularizer]:
    """One term per entry of `regularizers` (name -> its config), in the order listed."""
    return [REGULARIZERS.get(str(name))(str(name), node) for name, node in nodes.items()]
