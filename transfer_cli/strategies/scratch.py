"""Training from scratch (RI-T): the reference that shows what pretraining bought."""
from transfer_cli.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("scratch")
class Scratch(Strategy):
    """Train the same architecture from a random initialisation (RI-T baseline)."""

    pretrained_body = False
