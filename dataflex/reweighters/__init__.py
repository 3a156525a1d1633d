"""Reweighters output per-sample weights (mean 1 over the global batch)."""
from ..registry import Registry
from .loss import STRATEGIES, LossReweighter, loss_weights, normalise_losses

REWEIGHTERS = Registry("reweighter", {"loss": LossReweighter})

__all__ = ["REWEIGHTERS", "LossReweighter", "STRATEGIES", "loss_weights", "normalise_losses"]
