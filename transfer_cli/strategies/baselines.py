"""The two references every transfer method is measured against: full fine-tuning (P-T) and training
from scratch (RI-T), which shows what pretraining bought ("What is being transferred", Neyshabur et
al. 2020)."""
from transfer_cli.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("finetune")
class FineTune(Strategy):
    """Fine-tune every layer from the pretrained weights with a new head (P-T)."""


@STRATEGIES.register("scratch")
class Scratch(Strategy):
    """Train the same architecture from a random initialisation (RI-T baseline)."""

    pretrained_body = False
