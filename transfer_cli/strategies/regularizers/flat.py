"""`strategy=l2sp`, `delta` and `bss`: fine-tuning with one regularizer term, configured in the strategy's
own node (`strategy.alpha`, ...), as they were before terms could be listed. `strategy.bss_weight` on
l2sp and delta adds a BSS term (η = bss_weight, k = bss_k); BSS's penalty then comes first, the order
these terms always had."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from transfer_cli.strategies.base import STRATEGIES, Strategy
from transfer_cli.strategies.regularizers.base import REGULARIZERS, Regularizer


class RegularizedFineTune(Strategy):
    """Fine-tuning whose loss carries the term named `term`, read from the strategy's own config."""

    term = ""

    @classmethod
    def own_regularizers(cls, cfg: DictConfig) -> list[Regularizer]:
        terms = [REGULARIZERS.get(cls.term)(cls.term, cfg)]
        if float(cfg.get("bss_weight", 0.0)):
            bss = OmegaConf.create({"weight": cfg.bss_weight, "k": cfg.get("bss_k", 1)})
            terms.insert(0, REGULARIZERS.get("bss")("bss", bss))
        return terms


@STRATEGIES.register("l2sp")
class L2SPFineTune(RegularizedFineTune):
    """Fine-tuning with α/2‖w − w⁰‖² on the body + β/2‖w_head‖², instead of weight decay (L2-SP)."""

    term = "l2sp"


@STRATEGIES.register("delta")
class DeltaFineTune(RegularizedFineTune):
    """Fine-tuning with an attention-weighted distance of feature maps to the pretrained model's (DELTA)."""

    term = "delta"


@STRATEGIES.register("bss")
class BSSFineTune(RegularizedFineTune):
    """Fine-tuning that shrinks the smallest singular values of the batch's penultimate features (BSS)."""

    term = "bss"
