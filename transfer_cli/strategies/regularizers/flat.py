"""`strategy=l2sp`, `delta`, `bss`, `co_tuning`, `lwf`, `stochnorm`, `bi_tuning`, `hybrid_forward` and
`l2t_ww`: fine-tuning with one regularizer term, configured in the strategy's
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


@STRATEGIES.register("co_tuning")
class CoTuningFineTune(RegularizedFineTune):
    """Fine-tuning while the source classifier keeps learning the target labels translated into source classes (Co-Tuning)."""

    term = "co_tuning"


@STRATEGIES.register("lwf")
class LwFFineTune(RegularizedFineTune):
    """Fine-tuning that distils the source head's original outputs into it on the current features (LwF)."""

    term = "lwf"


@STRATEGIES.register("stochnorm")
class StochNormFineTune(RegularizedFineTune):
    """Fine-tuning with BatchNorm channels that use batch or moving statistics at random (StochNorm)."""

    term = "stochnorm"


@STRATEGIES.register("bi_tuning")
class BiTuningFineTune(RegularizedFineTune):
    """Fine-tuning with contrastive terms on projections and class weights, and a momentum key encoder (Bi-Tuning)."""

    term = "bi_tuning"


@STRATEGIES.register("hybrid_forward")
class HybridForwardFineTune(RegularizedFineTune):
    """Fine-tuning with two paths alternating the student's and the frozen teacher's blocks (Hybrid Forward)."""

    term = "hybrid_forward"


@STRATEGIES.register("l2t_ww")
class L2TWWFineTune(RegularizedFineTune):
    """Fine-tuning with meta-learned weighted matching of the source network's feature maps (L2T-ww)."""

    term = "l2t_ww"
