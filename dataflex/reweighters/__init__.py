"""Reweighters output per-sample weights (state.sample_weights) or per-token weights
(state.token_weights, with `needs_token_losses = True`). The loss wrapper normalises by the weights'
total, so only their ratios matter; sample weights are returned with mean 1 by convention."""
from dataflex.core.registry import Registry
from dataflex.reweighters.anchor import AnchorReweighter, anchor_similarity, anchor_weights
from dataflex.reweighters.focal import FocalReweighter, focal_weights
from dataflex.reweighters.loss import STRATEGIES, LossReweighter, annealed_temperature, loss_weights, normalise_losses
from dataflex.reweighters.rho1 import Rho1Reweighter, rho1_token_weights
from dataflex.reweighters.tilted import TiltedReweighter, tilted_weights

REWEIGHTERS = Registry("reweighter", {"loss": LossReweighter, "tilted": TiltedReweighter, "focal": FocalReweighter,
                                      "rho1": Rho1Reweighter, "anchor": AnchorReweighter})

__all__ = ["REWEIGHTERS", "AnchorReweighter", "FocalReweighter", "LossReweighter", "Rho1Reweighter", "STRATEGIES",
           "TiltedReweighter", "anchor_similarity", "anchor_weights", "annealed_temperature", "focal_weights",
           "loss_weights", "normalise_losses", "rho1_token_weights", "tilted_weights"]
