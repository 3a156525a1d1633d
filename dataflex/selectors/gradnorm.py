"""Gradient-norm selection: GraNd and its cheap proxy EL2N (Paul, Ganguli, Dziugaite; NeurIPS 2021).

    GraNd(x) = || grad_theta l(x) ||          (exact per-sample gradient norm over `params`)
    EL2N(x)  = mean over label tokens of || softmax(logits_t) - onehot(y_t) ||_2

Keep the candidates with the largest score: samples with the largest gradient are the ones the
current model would learn most from. GraNd's norms come from the interface's per-sample gradient
norms (the ghost path where the model allows it: no per-sample gradient is materialised); EL2N
needs only a forward without gradients. The paper averages GraNd over several initialisations at
the start of training; here the score is online, at the current parameters.
"""
from __future__ import annotations

import torch

from dataflex.core.plugin import Selector
from dataflex.core.state import DataState
from dataflex.selectors.loss import select_top_loss


class GradNormSelector(Selector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "score": ('grand', 'el2n')}
    def __init__(self, keep_fraction: float = 0.5, score: str = "grand", params="all"):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        if score not in ("grand", "el2n"):
            raise ValueError(f"selector.score must be 'grand' or 'el2n', got {score!r}")
        self.keep_fraction, self.score, self.params = keep_fraction, score, params
        self.candidate_factor = 1.0 / keep_fraction

    def select(self, state: DataState) -> torch.Tensor:
        if self.score == "el2n":
            scores = state.signals.probe(state.candidate_ids, output="el2n")
        else:
            scores = state.signals.per_sample_grad_norms(state.candidate_ids, params=self.params)
        mask = select_top_loss(scores, state.global_batch_size)
        state.metrics.update({f"selector/kept_{self.score}_mean": float(scores[mask].mean()),
                              f"selector/candidate_{self.score}_mean": float(scores.mean())})
        return mask
