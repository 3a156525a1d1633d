"""RHO-LOSS: prioritised training on points that are learnable, worth learning and not yet learnt
(Mindermann et al., ICML 2022).

From a candidate batch of n_B samples, keep the n_b with the largest reducible holdout loss

    score(x) = l_theta(x) - l_IL(x),

l_IL being the loss of an "irreducible loss" model trained on holdout data: an earlier dataflex
run (`reference=RUN_DIR`, see dataflex.run.reference), probed on the same candidates. Noisy or
unlearnable samples have a high loss under both models and a low score, where plain top-loss
selection would pick them. The paper keeps n_b / n_B = 0.1; both probes are forwards without
gradients over the candidate batch.
"""
from __future__ import annotations

import torch

from dataflex.core.plugin import Selector
from dataflex.core.state import DataState
from dataflex.grad.interface import as_reference
from dataflex.selectors.loss import select_top_loss


def rho_scores(losses: torch.Tensor, irreducible: torch.Tensor) -> torch.Tensor:
    return losses.double() - irreducible.double()


class RhoLossSelector(Selector):
    SETTINGS = {"keep_fraction": "(0, 1]"}   # checked before any data is read (dataflex.core.settings)
    def __init__(self, reference=None, keep_fraction: float = 0.1):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        if reference is None:
            raise ValueError("rho needs an irreducible-loss model: selector.reference=RUN_DIR (an earlier run "
                             "trained on holdout data with trainer.checkpoint_every)")
        self.reference_spec, self.reference = reference, None
        self.keep_fraction = keep_fraction
        self.candidate_factor = 1.0 / keep_fraction

    def select(self, state: DataState) -> torch.Tensor:
        if self.reference is None:
            self.reference = as_reference(self.reference_spec)
        losses = state.signals.probe(state.candidate_ids)
        irreducible = state.signals.probe(state.candidate_ids, interface=self.reference)
        state.candidate_losses = losses
        scores = rho_scores(losses, irreducible)
        mask = select_top_loss(scores, state.global_batch_size)
        state.metrics.update({"selector/kept_score_mean": float(scores[mask].mean()),
                              "selector/candidate_score_mean": float(scores.mean()),
                              "selector/kept_loss_mean": float(losses[mask].mean())})
        return mask
