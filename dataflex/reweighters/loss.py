"""Dynamic loss-based sample reweighting (Sow, Lin, Shroff, Liang, ICLR 2025).

Per-sample losses of the global batch are normalised to [-1, 1] with the batch min and max,
    x_i = (2 l_i - (l_max + l_min)) / max(l_max - l_min, 1e-6),
shaped by a strategy f (delta = 1),
    linupper  min(x + 1, 1)    low-loss half downweighted linearly, upper half flat (default)
    quadratic 1 - x^2          favours medium loss
    extremes  |x|              favours both tails
    upper     0.5 x + 0.5      linear increase
and turned into the KL-regularised weights w_i = softmax((f_i - max f) / r): r -> inf is uniform.
The loss is sum_i w_i l_i; here weights are returned times B (mean 1), so uniform is the plain mean.
For the first `burnout_steps` steps every weight is 1.
"""
from __future__ import annotations

import torch

from ..plugin import Reweighter
from ..state import DataState

STRATEGIES = {
    "linupper": lambda x: torch.clamp(x + 1, max=1.0),
    "quadratic": lambda x: 1 - x ** 2,
    "extremes": lambda x: x.abs(),
    "upper": lambda x: 0.5 * x + 0.5,
}


def normalise_losses(losses: torch.Tensor) -> torch.Tensor:
    lo, hi = losses.min(), losses.max()
    return (2 * losses - (hi + lo)) / torch.clamp(hi - lo, min=1e-6)


def loss_weights(losses: torch.Tensor, strategy: str = "linupper", temperature: float = 0.4) -> torch.Tensor:
    """Weights summing to 1 over the batch."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown reweighting strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
    f = STRATEGIES[strategy](normalise_losses(losses.double()))
    return torch.softmax((f - f.max()) / temperature, 0)


class LossReweighter(Reweighter):
    def __init__(self, strategy: str = "linupper", temperature: float = 0.4, burnout_steps: int = 1000):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown reweighting strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
        if temperature <= 0:
            raise ValueError(f"reweighter.temperature must be positive, got {temperature}")
        self.strategy, self.temperature, self.burnout_steps = strategy, temperature, burnout_steps

    def weigh(self, state: DataState) -> torch.Tensor:
        n = state.losses.numel()
        if state.step < self.burnout_steps:
            w = torch.ones(n, dtype=torch.float64)
        else:
            w = loss_weights(state.losses, self.strategy, self.temperature) * n
        state.metrics.update({"reweighter/weight_min": float(w.min()), "reweighter/weight_max": float(w.max()),
                              "reweighter/weight_std": float(w.std()) if n > 1 else 0.0})
        return w
