"""Tilted empirical risk minimisation (Li, Beirami, Sanjabi, Smith; ICLR 2021).

The tilted risk (1/t) log mean_i exp(t l_i) has the gradient sum_i w_i grad l_i with

    w_i = exp(t l_i) / sum_j exp(t l_j)        (times B here: weights of mean 1)

t > 0 leans on the hardest samples (t -> inf: the max loss), t < 0 suppresses outliers
(t -> -inf: the min loss), t = 0 is the plain mean. It is Sow et al.'s KL-regularised weighting
with f = identity and r = 1/t. Per-sample losses of the global batch are used, so every rank
computes the same weights; the first `burnout_steps` steps are unweighted.

Which mean: under the run's default token mean (`trainer.loss_reduction=token`) a sample weight w_i
multiplies each of the sample's n_i label tokens, so sample i's share of the loss is
w_i n_i / sum_j w_j n_j: the weighting is length-weighted (a long sample counts more, as it does
unweighted). The paper's per-sample form, sum_i w_i lbar_i / sum_i w_i over per-sample means, is
`trainer.loss_reduction=sample` (`DataFlex(loss_reduction="sample")`).
"""
from __future__ import annotations

import torch

from dataflex.core.plugin import Reweighter
from dataflex.core.state import DataState
from dataflex.reweighters.common import weight_stats


def tilted_weights(losses: torch.Tensor, t: float) -> torch.Tensor:
    """Weights summing to 1: softmax(t * losses), computed in float64."""
    return torch.softmax(t * losses.double(), 0)


class TiltedReweighter(Reweighter):
    SETTINGS = {"burnout_steps": "[0, inf)"}   # checked before any data is read (dataflex.core.settings)
    def __init__(self, t: float = 1.0, burnout_steps: int = 0):
        self.t, self.burnout_steps = float(t), burnout_steps

    def weigh(self, state: DataState) -> torch.Tensor:
        n = state.losses.numel()
        if state.step < self.burnout_steps:
            w = torch.ones(n, dtype=torch.float64)
        else:
            w = tilted_weights(state.losses, self.t) * n
        state.metrics.update(weight_stats(w))
        return w
