"""Rho-1: Selective Language Modeling (Lin et al., NeurIPS 2024, "Not all tokens are what you need").

Every label token of the global batch gets an excess loss over a reference model,

    s_t = l_theta(t) - l_ref(t),

the reference being trained on high-quality (target) data, and only the top `keep_fraction` of
the batch's label tokens by s_t are trained on: token weight 1 for them, 0 for the rest, and the
loss is the mean over the kept tokens. Exactly round(keep_fraction * n) of the n label tokens are
kept (ties broken by position, so every rank keeps the same ones). The paper keeps 60-70%;
0.6 here.

The reference is an earlier dataflex run (`reference=RUN_DIR` or a checkpoint folder; see
dataflex.run.reference), probed on the same tokens at every step: a forward without gradients of the
batch, reported separately from the reweighting cost in `bench/`.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.plugin import Reweighter
from dataflex.core.state import DataState
from dataflex.grad.interface import as_reference


def rho1_token_weights(token_losses: torch.Tensor, reference_losses: torch.Tensor, token_mask: torch.Tensor,
                       keep_fraction: float) -> torch.Tensor:
    """[B, T] 0/1 weights keeping the top `keep_fraction` of label tokens by excess loss."""
    excess = (token_losses.double() - reference_losses.double()).flatten()
    label = token_mask.flatten() > 0
    n = int(label.sum())
    k = int(round(keep_fraction * n))
    weights = torch.zeros_like(excess)
    if k > 0:
        candidates = torch.nonzero(label).squeeze(1)
        order = torch.sort(excess[candidates], descending=True, stable=True).indices[:k]
        weights[candidates[order]] = 1.0
    return weights.view_as(token_losses)


class Rho1Reweighter(Reweighter):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "burnout_steps": "[0, inf)"}
    needs_token_losses = True

    def __init__(self, reference=None, keep_fraction: float = 0.6, burnout_steps: int = 0):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"reweighter.keep_fraction must be in (0, 1], got {keep_fraction}")
        if reference is None:
            raise ValueError("rho1 needs a reference model: reweighter.reference=RUN_DIR (an earlier run "
                             "trained with trainer.checkpoint_every, e.g. on the target data)")
        self.reference_spec = reference
        self.reference = None
        self.keep_fraction, self.burnout_steps = keep_fraction, burnout_steps

    def setup_reference(self):
        if self.reference is None:
            self.reference = as_reference(self.reference_spec)
        return self.reference

    def weigh(self, state: DataState) -> Optional[torch.Tensor]:
        if state.step < self.burnout_steps:
            return None
        ref = state.signals.probe(state.batch_ids, output="token_loss", interface=self.setup_reference())
        w = rho1_token_weights(state.token_losses, ref, state.token_mask, self.keep_fraction)
        state.token_weights = w
        label = state.token_mask > 0
        excess = (state.token_losses - ref)[label]
        state.metrics.update({"reweighter/kept_fraction": float(w[label].mean()),
                              "reweighter/excess_mean": float(excess.mean()),
                              "reweighter/reference_loss": float(ref[label].mean())})
        return None
