"""Full fine-tuning (P-T): the body starts from the pretrained weights, the head is new, all train."""
from transfer_cli.strategies.base import STRATEGIES, Strategy


@STRATEGIES.register("finetune")
class FineTune(Strategy):
    """Fine-tune every layer from the pretrained weights with a new head (P-T)."""
