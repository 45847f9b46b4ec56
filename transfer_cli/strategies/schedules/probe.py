"""The linear probe as Kornblith, Shlens & Le fit it ("Do Better ImageNet Models Transfer Better?",
CVPR 2019): L2-regularised multinomial logistic regression on the frozen body's features, solved by
L-BFGS, with the L2 strength chosen on a held-out validation split.

The objective is mean cross-entropy + l2/2 ‖W‖² (the bias is not penalised), solved to convergence
for every strength of a log-spaced grid (the paper: 45 values from 1e-6 to 1e5), strongest first,
each solve starting from the previous solution. The strength with the highest validation accuracy
wins, ties broken by lower validation loss (the loop's rule for the best epoch). Where we depart: the
paper then refits on train + validation; here the validation split stays what it is for every
strategy, the data that selects, so the probe sees the same labels as the other strategies.

A convex problem solved to its optimum: no learning rate, no epochs, a loss that cannot diverge
(SGD at the fine-tuning rate on un-normalised features can: issue 15 measured a validation loss of
10 on EfficientNet-Lite0 features with 67 % accuracy).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from transfer_cli.errors import TransferCliError


@dataclass
class Probe:
    """One solved probe: the head's weights, and how it did on the data it was fit and chosen on."""

    l2: float
    weight: torch.Tensor
    bias: torch.Tensor
    train_loss: float  # mean cross-entropy, penalty excluded
    train_acc1: float
    val_loss: float
    val_acc1: float
    iterations: int


def l2_grid(low: float, high: float, count: int) -> list[float]:
    """`count` strengths, log-spaced from `high` down to `low` (strongest first: warm starts go from a
    nearly-zero head to a sharper one)."""
    if count == 1:
        return [float(high)]
    step = (math.log10(low) - math.log10(high)) / (count - 1)
    return [10 ** (math.log10(high) + i * step) for i in range(count)]


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, start: tuple[torch.Tensor, torch.Tensor],
                 max_iter: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise mean CE(x Wᵀ + b, y) + l2/2 ‖W‖² by L-BFGS (strong Wolfe line search) from `start`;
    returns W, b and the iterations taken."""
    weight = start[0].clone().requires_grad_(True)
    bias = start[1].clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    iterations = optimizer.state[optimizer._params[0]].get("n_iter", 0)
    return weight.detach(), bias.detach(), int(iterations)


def _score(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[float, float]:
    logits = x @ weight.T + bias
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item()


@torch.no_grad()
def select_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], num_classes: int,
                 grid: list[float], max_iter: int) -> tuple[Probe, list[Probe]]:
    """Solve the probe for every strength of `grid` and keep the best on validation; returns it and every
    solve (for results.json)."""
    (train_x, train_y), (val_x, val_y) = train, val
    if not len(val_y):
        raise TransferCliError("strategy.solver=lbfgs chooses its L2 strength on the validation split, which is "
                               "empty; set data.val_fraction above 0 or strategy.solver=sgd")
    train_x, val_x = train_x.flatten(1).float(), val_x.flatten(1).float()
    start = (train_x.new_zeros(num_classes, train_x.shape[1]), train_x.new_zeros(num_classes))
    solved = []
    for l2 in grid:
        with torch.enable_grad():
            weight, bias, iterations = fit_logistic(train_x, train_y, l2, start, max_iter)
        start = (weight, bias)
        train_loss, train_acc1 = _score(train_x, train_y, weight, bias)
        val_loss, val_acc1 = _score(val_x, val_y, weight, bias)
        solved.append(Probe(l2, weight, bias, train_loss, train_acc1, val_loss, val_acc1, iterations))
    best = max(solved, key=lambda p: (p.val_acc1, -p.val_loss))
    return best, solved
