"""ULMFiT's gradual unfreezing (Howard & Ruder, ACL 2018).

The head trains alone first; then, every `unfreeze_every` epochs, the next group down joins, until all
groups train. The trainable set is a function of the epoch alone, so a resume needs no saved state.
The paper pairs it with discriminative rates (optim.layer_decay=2.6) and STLR (sched=stlr).
"""
from __future__ import annotations

from transfer_cli.backbones.model import TransferModel
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.schedules.schedule import LayerSchedule, positive_int


@STRATEGIES.register("gradual_unfreeze")
class GradualUnfreeze(LayerSchedule):
    """Epoch e trains the top 1 + e // unfreeze_every groups (the head counts as one)."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        self.unfreeze_every = positive_int(cfg, "unfreeze_every")

    def stages(self, model: TransferModel) -> list[list[str]]:
        names = model.group_names()
        return [names[len(names) - 1 - i:] for i in range(len(names))]

    def stage_at(self, epoch: int, count: int) -> int:
        return min(epoch // self.unfreeze_every, count - 1)

    def remedy(self, needed: int) -> str:
        return f"set trainer.max_epochs={needed} or a smaller strategy.unfreeze_every"
