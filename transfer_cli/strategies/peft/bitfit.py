"""BitFit (Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022): only the bias terms of the body train, with the head.

Every parameter named `bias` in the body: the query, key, value, attention output and both feed-forward
biases and the LayerNorm shifts of a BERT (the paper's set), the BatchNorm shifts of a ResNet (whose
convolutions have none). Weights and BatchNorm statistics stay bit-identical. The trained biases are
the body's own, so `export` writes a backbone that reproduces the run.
"""
from __future__ import annotations

from transfer_cli.backbones.model import TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.peft.shared import PeftStrategy


@STRATEGIES.register("bitfit")
class BitFit(PeftStrategy):
    """Only the body's bias terms (and the head) train."""

    def adapt(self, model: TransferModel) -> dict[str, str]:
        biases = [p for name, p in model.body.named_parameters() if name.rpartition(".")[2] == "bias"]
        if not biases:
            raise TransferCliError("strategy=bitfit: this backbone has no bias terms to train")
        for p in biases:
            p.requires_grad_(True)
        return {}
