"""SpotTune (Guo et al., "SpotTune: Transfer Learning through Adaptive Fine-tuning", CVPR 2019).

Every block l runs twice, frozen F_l (pretrained, eval-mode BatchNorm) and fine-tuned F̂_l (from the
same weights); a policy network looks at the input and decides per example which one feeds the next
block: x_l = I_l(x)·F̂_l(x_{l−1}) + (1 − I_l(x))·F_l(x_{l−1}) (see `routing`). I(x) is sampled with
Gumbel-softmax, one-hot in the forward pass and soft in the backward pass (straight-through); at
evaluation it is the argmax, so the same input always takes the same path.

What the official code (github.com/gyhui14/spottune) does, and what we follow:
- policy network (`agent_net.resnet`): a ResNet with one basic block per stage, widths 32 (stem),
  64, 128, 256, stride 2 per stage, parameter-free shortcuts (average pool, zero-padded channels),
  BN + ReLU, global pool and a linear layer to 2 logits per block; it sees the same image as the
  network. We build the same shape, its stem width from `policy_width`. The official networks (ResNet-26
  on 64-px Visual Decathlon images) have no downsampling before their first block, so there the agent
  runs at the resolution of the network's first block and costs a fraction of the network. An ImageNet
  ResNet's stem reduces 4x before its first block; an agent on the full image would then cost as much
  as the whole network (resnet18 at 64 px: about 170 vs 150 MFLOPs per image). So the agent sees the
  image average-pooled to the resolution of the first block (`policy_downsample: auto`; 1 = full image),
  which keeps the official ratio of agent to network. Text has no image: there the
  policy is the frozen pretrained word embeddings, mean-pooled over real tokens, then an MLP.
- Gumbel-softmax temperature: 5 (`gumbel_softmax.py`'s default; main.py passes none). The official
  test loop also samples Gumbel noise; we take the argmax instead, as the paper's test-time routing
  and this project's determinism require (config comment).
- optimizers: network SGD lr 0.1, policy ("agent") SGD lr 0.01, momentum 0.9, weight decay 0.001:
  the policy gets its own group at `policy_lr_mult` = 0.1 × the run's rate, weight decay 0.001.
- the first conv stays trainable and shared by both paths, and the official code only freezes the
  frozen path's conv weights (its BatchNorm trains). Here the frozen path is wholly frozen (the issue's
  bit-identical property) and `shared` (default `train`) says whether the stem / embeddings train.
- Global-SpotTune (the paper's compact variant) is not in the released code; `budget_k` adds
  budget_weight · (mean number of fine-tuned blocks per example − k)², the paper's constraint that
  about k blocks fine-tune, as a penalty logged under penalty/spottune_budget.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from transfer_cli.backbones.model import Batch, TransferModel
from transfer_cli.errors import TransferCliError
from transfer_cli.strategies.base import STRATEGIES
from transfer_cli.strategies.routing.routed import RoutedStrategy
from transfer_cli.strategies.routing.sites import Decider, Site, pooled


class _PolicyBlock(nn.Module):
    """A stride-2 basic block whose shortcut is an average pool with zero-padded channels (no weights)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.extra = cout - cin
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = F.pad(F.avg_pool2d(x, 2, ceil_mode=True), (0, 0, 0, 0, 0, self.extra))
        return F.relu(self.body(x) + shortcut)


class ImagePolicy(nn.Module):
    """The official agent's shape: stem, three one-block stages (2w, 4w, 8w), pool, linear; on the image
    average-pooled by `downsample`."""

    def __init__(self, in_chans: int, width: int, outputs: int, downsample: int):
        super().__init__()
        self.downsample = downsample
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.stages = nn.Sequential(_PolicyBlock(width, 2 * width), _PolicyBlock(2 * width, 4 * width),
                                    _PolicyBlock(4 * width, 8 * width))
        self.norm = nn.Sequential(nn.BatchNorm2d(8 * width), nn.ReLU())
        self.fc = nn.Linear(8 * width, outputs)

    def forward(self, batch: Batch) -> torch.Tensor:
        x = batch["pixel_values"]
        if self.downsample > 1:
            x = F.avg_pool2d(x, self.downsample, ceil_mode=True)
        x = self.norm(self.stages(F.relu(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class TextPolicy(nn.Module):
    """Frozen pretrained word embeddings, mean-pooled over real tokens, then a one-hidden-layer MLP."""

    def __init__(self, embeddings: nn.Embedding, width: int, outputs: int):
        super().__init__()
        self.embeddings = copy.deepcopy(embeddings).requires_grad_(False)
        self.mlp = nn.Sequential(nn.Linear(embeddings.embedding_dim, width), nn.ReLU(), nn.Linear(width, outputs))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.mlp(pooled(self.embeddings(batch["input_ids"]), batch.get("attention_mask")))


class Policy(Decider):
    """Per-example, per-block decisions: Gumbel-softmax straight-through in training, argmax in eval."""

    def __init__(self, net: nn.Module, blocks: int, temperature: float):
        super().__init__()
        self.net, self.blocks, self.temperature = net, blocks, temperature
        self.decisions: torch.Tensor | None = None  # (batch, blocks), 1 = fine-tuned path

    def begin(self, batch: Batch) -> None:
        logits = self.net(batch).float().view(-1, self.blocks, 2)
        if self.training:
            self.decisions = F.gumbel_softmax(logits, tau=self.temperature, hard=True)[..., 1]
        else:
            self.decisions = (logits[..., 1] > logits[..., 0]).float()

    def gate(self, index: int, site_input: torch.Tensor) -> torch.Tensor:
        return self.decisions[:, index]


@STRATEGIES.register("spottune")
class SpotTune(RoutedStrategy):
    """Route each example through the frozen or the fine-tuned copy of every block, by a policy network."""

    def __init__(self, cfg, optim, regularizers=()):
        super().__init__(cfg, optim, regularizers)
        if float(cfg.temperature) <= 0:
            raise TransferCliError(f"strategy.temperature={cfg.temperature} must be positive")

    def decider(self, model: TransferModel, sites: list[Site]) -> Decider:
        blocks, width = len(sites), int(self.cfg.policy_width)
        if self.cfg.budget_k is not None and not 0 <= float(self.cfg.budget_k) <= blocks:
            raise TransferCliError(f"strategy.budget_k={self.cfg.budget_k} must be between 0 and {blocks} (the blocks)")
        if model.modality == "image":
            image_shape = model.preprocessing["input_size"]
            net = ImagePolicy(image_shape[0], width, 2 * blocks, self.policy_downsample(image_shape, sites[0]))
        else:
            net = TextPolicy(model.body.get_input_embeddings(), width, 2 * blocks)
        return Policy(net, blocks, float(self.cfg.temperature))

    def policy_downsample(self, image_shape: tuple[int, ...], first: Site) -> int:
        """How much the policy pools the image: `auto` = down to the first block's input resolution."""
        setting = self.cfg.policy_downsample
        if str(setting) == "auto":
            return max(1, image_shape[-1] // first.input_shape[-1]) if len(first.input_shape) == 3 else 1
        if not (isinstance(setting, int) and setting >= 1):
            raise TransferCliError(f"strategy.policy_downsample={setting} must be auto or a positive integer")
        return setting

    def penalty(self, model: TransferModel, batch: Batch, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.cfg.budget_k is None or self.routing.force is not None:
            return {}
        used = self.routing.decider.decisions.sum(dim=1).mean()
        return {"spottune_budget": float(self.cfg.budget_weight) * (used - float(self.cfg.budget_k)) ** 2}
