"""Selectors output a keep mask over candidate samples."""
from ..registry import Registry
from .loss import LossSelector, select_top_loss

SELECTORS = Registry("selector", {"loss": LossSelector})

__all__ = ["SELECTORS", "LossSelector", "select_top_loss"]
