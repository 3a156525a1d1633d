"""Loss-based online batch selection: keep the highest-loss samples of a larger candidate batch.

Draw B / keep_fraction candidates, probe their losses without gradients, train on the top B
(Loshchilov & Hutter 2015's hard-example selection; Composer's Selective Backprop in its
deterministic form). Ties go to the earlier candidate, so every rank keeps the same samples.
"""
from __future__ import annotations

import torch

from dataflex.core.plugin import Selector
from dataflex.core.state import DataState


def select_top_loss(losses: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest losses (stable: equal losses keep the lower index)."""
    if not 0 < k <= losses.numel():
        raise ValueError(f"cannot keep {k} of {losses.numel()} candidates")
    order = torch.sort(losses.double(), descending=True, stable=True).indices
    mask = torch.zeros(losses.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


class LossSelector(Selector):
    SETTINGS = {"keep_fraction": "(0, 1]"}   # checked before any data is read (dataflex.core.settings)
    def __init__(self, keep_fraction: float = 0.5):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        self.keep_fraction = keep_fraction
        self.candidate_factor = 1.0 / keep_fraction

    def select(self, state: DataState) -> torch.Tensor:
        losses = state.signals.probe(state.candidate_ids)
        state.candidate_losses = losses
        mask = select_top_loss(losses, state.global_batch_size)
        state.metrics["selector/kept_loss_mean"] = float(losses[mask].mean())
        state.metrics["selector/candidate_loss_mean"] = float(losses.mean())
        return mask
