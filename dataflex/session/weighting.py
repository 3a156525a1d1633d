"""How a step's weights compose (the loss wrapper normalises by their global total, dataflex.core.loss):

    sample weight = finite(loss) x the mixer's domain loss weight (apply=loss) x the reweighter's sample weight
    token weight  = the token-level reweighter's weight x the label mask (multiplying the sample weight)

A sample whose loss is not finite gets weight 0 (`trainer.nonfinite=drop`)."""
from __future__ import annotations

from typing import Optional

import torch


def compose_sample_weights(state, finite: torch.Tensor) -> torch.Tensor:
    weights = finite.double()
    if state.domain_loss_weights is not None:
        weights = weights * state.domain_loss_weights.double()[state.batch_domains]
    if state.sample_weights is not None:
        w = state.sample_weights.double()
        if w.shape != weights.shape or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"state.sample_weights must be finite, non-negative and shaped "
                             f"{tuple(weights.shape)}; got {w.tolist()[:8]}")
        weights = weights * w
    return weights


def checked_token_weights(state) -> Optional[torch.Tensor]:
    """The reweighter's token weights on label tokens only (float64), or None without a token reweighter."""
    if state.token_weights is None:
        return None
    token_weights = state.token_weights.double()
    if state.token_mask is None or token_weights.shape != state.token_mask.shape \
            or not torch.isfinite(token_weights).all() or (token_weights < 0).any():
        raise ValueError("state.token_weights must be finite, non-negative and shaped like "
                         "state.token_losses (set needs_token_losses = True on the plugin); got shape "
                         f"{tuple(token_weights.shape)}")
    return token_weights * state.token_mask.double()


def lr_note(optimizer) -> str:
    """' at learning rate X' for an error message, when the optimizer says."""
    try:
        return f" at learning rate {optimizer.param_groups[0]['lr']:.3g}" if optimizer is not None else ""
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""
