"""Sequential unfreezing (Chronopoulou, Baziotis & Potamianos, NAACL 2019, "SiATL").

The new parameters (the head) train alone for n epochs, then everything but the embedding layer
(here: the first body group, the stem) for k epochs, then everything. The paper's auxiliary LM loss
is not implemented (`aux_lm` must stay false). Like gradual unfreezing, a function of the epoch alone.
"""
from __future__ import annotations

from transfer_cli.backbones.model import HEAD, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.schedules.schedule import LayerSchedule, positive_int


@STRATEGIES.register("sequential_unfreeze")
class SequentialUnfreeze(LayerSchedule):
    """Head for n epochs, all but the first body group for k more, then all groups."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        if cfg.aux_lm:
            raise TransferCliError("strategy.aux_lm=true (SiATL's auxiliary LM loss) is not supported yet; "
                                   "set strategy.aux_lm=false")
        self.n = positive_int(cfg, "n", minimum=0)
        self.k = positive_int(cfg, "k", minimum=0)

    def stages(self, model: TransferModel) -> list[list[str]]:
        names = model.group_names()
        return [[HEAD], names[1:], names]

    def stage_at(self, epoch: int, count: int) -> int:
        return 0 if epoch < self.n else 1 if epoch < self.n + self.k else 2

    def remedy(self, needed: int) -> str:
        return f"set trainer.max_epochs={needed} or smaller strategy.n / strategy.k"
