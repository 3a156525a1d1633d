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
For the first `burnout_steps` steps every weight is 1. The paper's optional large-r start:
`initial_temperature` (> temperature) decays geometrically to `temperature` over `anneal_steps`
after the burn-out, so the weights start near uniform and sharpen.

Which mean: the weights multiply each sample's loss inside the run's reduction
(`trainer.loss_reduction`). `sample` is the README form of the paper (sum_i w_i l_i over per-sample
means); `token` (dataflex's default) weighs each sample's label tokens by w_i, close to the
reference trainer's token-fraction scaling: sample i's share of the loss is then
w_i n_i / sum_j w_j n_j for n_i label tokens, so the weighting is length-weighted.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.plugin import Reweighter
from dataflex.core.state import DataState
from dataflex.reweighters.common import weight_stats

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


def annealed_temperature(step: int, start: int, temperature: float, initial: float, steps: int) -> float:
    """Geometric decay from `initial` at `start` to `temperature` at `start + steps`, then constant."""
    if steps <= 0 or step >= start + steps:
        return temperature
    progress = max(0, step - start) / steps
    return initial * (temperature / initial) ** progress


class LossReweighter(Reweighter):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"temperature": "(0, inf)", "burnout_steps": "[0, inf)", "initial_temperature": "(0, inf)",
                "anneal_steps": "[0, inf)"}
    def __init__(self, strategy: str = "linupper", temperature: float = 0.4, burnout_steps: int = 1000,
                 initial_temperature: Optional[float] = None, anneal_steps: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown reweighting strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
        if temperature <= 0 or (initial_temperature is not None and initial_temperature <= 0):
            raise ValueError(f"reweighter.temperature must be positive, got {temperature}, {initial_temperature}")
        self.strategy, self.temperature, self.burnout_steps = strategy, temperature, burnout_steps
        self.initial_temperature, self.anneal_steps = initial_temperature, anneal_steps

    def temperature_at(self, step: int) -> float:
        if self.initial_temperature is None:
            return self.temperature
        return annealed_temperature(step, self.burnout_steps, self.temperature, self.initial_temperature,
                                    self.anneal_steps)

    def weigh(self, state: DataState) -> torch.Tensor:
        n = state.losses.numel()
        if state.step < self.burnout_steps:
            w = torch.ones(n, dtype=torch.float64)
        else:
            r = self.temperature_at(state.step)
            w = loss_weights(state.losses, self.strategy, r) * n
            state.metrics["reweighter/temperature"] = r
        state.metrics.update(weight_stats(w))
        return w
