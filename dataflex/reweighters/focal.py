"""Focal loss as token weights (Lin, Goyal, Girshick, He, Dollar; ICCV 2017), for language modelling.

Each label token t weighs (1 - p_t)^gamma, p_t = exp(-l_t) the model's probability of the right
token: confidently predicted tokens fade, hard ones keep their weight; gamma = 0 is the plain
loss (gamma = 2 by default, as in the paper).

Two documented differences from the original loss FL = -(1 - p)^gamma log p: the weight is a
constant of the step (detached, like every dataflex weight), so the gradient is
sum (1 - p)^gamma grad(-log p) without the derivative of the modulating factor; and the loss
wrapper normalises by the weights' total (sum_t w_t l_t / sum_t w_t), so the step's scale stays
that of the unweighted loss while its direction is focal's.
"""
from __future__ import annotations

import functools

import torch

from dataflex.core.plugin import Reweighter
from dataflex.core.state import DataState
from dataflex.reweighters.common import weight_stats


def focal_weights(token_losses: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """(1 - exp(-l))^gamma, elementwise, in float64."""
    return (-torch.expm1(-token_losses.double().clamp(min=0))).pow(gamma)


class FocalReweighter(Reweighter):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"gamma": "[0, inf)", "burnout_steps": "[0, inf)"}
    needs_token_losses = True

    def __init__(self, gamma: float = 2.0, burnout_steps: int = 0):
        if gamma < 0:
            raise ValueError(f"reweighter.gamma must be >= 0, got {gamma}")
        self.gamma, self.burnout_steps = gamma, burnout_steps

    def token_weights_of_loss(self, state: DataState):
        """focal_weights of each token's loss (1 during burn-out): the lean loss forms its gradients in the
        forward."""
        if state.step < self.burnout_steps:
            return lambda token_losses: torch.ones_like(token_losses, dtype=torch.float64)
        return functools.partial(focal_weights, gamma=self.gamma)

    def weigh(self, state: DataState) -> None:
        if state.step < self.burnout_steps:
            return None
        w = focal_weights(state.token_losses, self.gamma)
        state.token_weights = w
        state.metrics.update(weight_stats(w[state.token_mask > 0], "reweighter/token_weight"))
        return None
