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


#: strategy=<term> -> what `transfer-cli list` says about it
SUMMARIES = {
    "l2sp": "Fine-tuning with α/2‖w − w⁰‖² on the body + β/2‖w_head‖², instead of weight decay (L2-SP).",
    "delta": "Fine-tuning with an attention-weighted distance of feature maps to the pretrained model's (DELTA).",
    "bss": "Fine-tuning that shrinks the smallest singular values of the batch's penultimate features (BSS).",
    "co_tuning": "Fine-tuning while the source classifier keeps learning the target labels translated into source "
                 "classes (Co-Tuning).",
    "lwf": "Fine-tuning that distils the source head's original outputs into it on the current features (LwF).",
    "stochnorm": "Fine-tuning with BatchNorm channels that use batch or moving statistics at random (StochNorm).",
    "bi_tuning": "Fine-tuning with contrastive terms on projections and class weights, and a momentum key encoder "
                 "(Bi-Tuning).",
    "hybrid_forward": "Fine-tuning with two paths alternating the student's and the frozen teacher's blocks "
                      "(Hybrid Forward).",
    "l2t_ww": "Fine-tuning with meta-learned weighted matching of the source network's feature maps (L2T-ww).",
}


def flat_strategy(term: str, summary: str) -> type[RegularizedFineTune]:
    """Register `strategy=<term>`: fine-tuning holding that one term."""
    cls = type(f"FineTuneWith_{term}", (RegularizedFineTune,), {"term": term, "__doc__": summary,
                                                                "__module__": __name__})
    return STRATEGIES.register(term)(cls)


for _term, _summary in SUMMARIES.items():
    flat_strategy(_term, _summary)
