"""A finished run reloaded for analysis: its selected weights, the weights it started from, the
pretrained backbone, another run's weights in the same architecture, and batches of its data.

Every analysis swaps whole state dicts into the one restored model, so all of them see exactly the
architecture and strategy wiring that `eval` sees (`engine.evaluate_run.restore_run`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from omegaconf import DictConfig

from transfer_cli.backbones import build_backbone
from transfer_cli.backbones.model import TransferModel
from transfer_cli.backbones.registry import first_line
from transfer_cli.engine.checkpoint import Checkpoints
from transfer_cli.engine.device import resolve_precision, to_device
from transfer_cli.engine.evaluate_run import restore_run
from transfer_cli.engine.run import Assembled
from transfer_cli.engine.seeding import seed_everything
from transfer_cli.errors import TransferCliError

State = dict[str, torch.Tensor]
Batches = list[dict[str, torch.Tensor]]


@dataclass
class LoadedRun:
    cfg: DictConfig
    run_dir: Path
    run: Assembled
    epoch: int  # the epoch of the selected (best.pt) weights
    device: torch.device
    precision: str
    final: State  # a copy of the selected weights, to swap back after trying others

    @property
    def model(self) -> TransferModel:
        return self.run.model


def load_run(cfg: DictConfig, run_dir: Path) -> LoadedRun:
    """Rebuild the run from its config and load its best checkpoint, as `eval` does."""
    run, epoch, device = restore_run(cfg, Path(run_dir))
    run.model.eval()
    precision = resolve_precision(str(cfg.trainer.precision), device)
    return LoadedRun(cfg, Path(run_dir), run, epoch, device, precision, clone_state(run.model))


def clone_state(model: torch.nn.Module) -> State:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_state(loaded: LoadedRun, pretrained: bool) -> State:
    """The model as `assemble` builds it at the run's seed, before any training step.

    With pretrained=strategy.pretrained_body this is exactly where training started (pretrained
    body or random init, plus the seeded new head); with pretrained=True it is the pretrained
    backbone, whatever the strategy.
    """
    seed_everything(int(loaded.cfg.seed))
    model = build_backbone(loaded.cfg.backbone, loaded.run.data.num_classes, pretrained=pretrained)
    state = model.state_dict()
    _check_fits(state, loaded, "the rebuilt initial model")
    return state


def initial_state(loaded: LoadedRun) -> State:
    """Where training started: the pretrained body (P-T) or the random init (scratch), seeded head."""
    return fresh_state(loaded, loaded.run.strategy.pretrained_body)


def pretrained_state(loaded: LoadedRun) -> State:
    """The pretrained backbone (with the run's seeded initial head)."""
    return fresh_state(loaded, True)


def other_run_state(loaded: LoadedRun, other_dir: Path) -> State:
    """Another run's selected weights, which must fit this run's architecture and classes."""
    checkpoints = Checkpoints(Path(other_dir))
    if not checkpoints.best.exists():
        raise TransferCliError(f"{other_dir} has no checkpoints/best.pt; give the folder of a finished run")
    try:
        checkpoints.load_best_into(loaded.model)
    except RuntimeError as err:
        raise TransferCliError(
            f"the weights of {other_dir} do not fit the model of {loaded.run_dir} ({first_line(err)}); "
            "compare runs of the same backbone and classes"
        ) from None
    state = clone_state(loaded.model)
    loaded.model.load_state_dict(loaded.final)
    return state


def _check_fits(state: Mapping[str, torch.Tensor], loaded: LoadedRun, what: str) -> None:
    final = loaded.final
    if state.keys() != final.keys() or any(state[k].shape != final[k].shape for k in final):
        raise TransferCliError(
            f"{what} does not match the trained model of {loaded.run_dir}: strategy "
            f"{loaded.cfg.strategy.name!r} changes the model's structure, which analyze does not support"
        )


def lerp_state(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], weight: float,
               keys: Optional[Iterable[str]] = None) -> State:
    """start + weight·(end − start) for floating-point entries (all, or only `keys`); the rest from `end`.

    torch.lerp is exact at both ends, so weight 0 gives `start` and weight 1 gives `end` bit for bit.
    """
    chosen = set(end) if keys is None else set(keys)
    return {k: torch.lerp(start[k].to(v.device), v, weight) if k in chosen and v.is_floating_point() else v
            for k, v in end.items()}


def take_batches(loaded: LoadedRun, split: str, max_examples: Optional[int]) -> Batches:
    """The first `max_examples` examples of a split (all when None), in the loader's order, on the device.

    The training loader's order is its epoch-0 shuffle; the test loader's is the split's own order.
    """
    loader = loaded.run.loaders[split]
    loader.set_epoch(0)
    batches, left = [], max_examples
    for batch in loader:
        if left is not None:
            batch = {k: v[:left] for k, v in batch.items()}
            left -= len(batch["labels"])
        batches.append(to_device(batch, loaded.device))
        if left is not None and left <= 0:
            break
    return batches
