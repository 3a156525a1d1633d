"""Online TracIn selection (Pruthi, Liu, Kale, Sundararajan, NeurIPS 2020; online form as in GREATS,
Wang et al., NeurIPS 2024).

TracIn scores a training sample by the inner product of its gradient with a target gradient,
summed over checkpoints: TracInCP(z, z') = sum_i eta_i <grad l(z; theta_i), grad l(z'; theta_i)>.
Online, at the current parameters, one step of SGD on z lowers the target loss by about
eta <grad l(z), grad L_target>, so keeping the candidates with the largest

    score(z) = <grad l(z), g_target>,   g_target = grad of the mean loss over the target set,

keeps what helps the target most (first order). `normalize=True` uses the cosine instead, which
keeps short, large-gradient samples from dominating (LESS's argument). The inner products come
from the interface's ghost path (no per-sample gradient is materialised); the target gradient is
recomputed every `refresh_every` steps.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.plugin import Selector
from dataflex.core.state import DataState
from dataflex.core.targets import resolve_target
from dataflex.selectors.loss import select_top_loss


def tracin_scores(dots: torch.Tensor, norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inner products, or cosines when the samples' gradient norms are given."""
    dots = dots.double()
    return dots if norms is None else dots / norms.double().clamp(min=1e-12)


class TracInSelector(Selector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "target_samples": "[1, inf)", "refresh_every": "[1, inf)"}
    def __init__(self, target: str = "target", keep_fraction: float = 0.5, params="all", target_samples: int = 64,
                 refresh_every: int = 10, normalize: bool = False):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        self.target, self.keep_fraction, self.params = target, keep_fraction, params
        self.target_samples, self.refresh_every, self.normalize = target_samples, refresh_every, normalize
        self.candidate_factor = 1.0 / keep_fraction
        self.target_grad: Optional[dict] = None
        self.refreshed_at = -1

    def select(self, state: DataState) -> torch.Tensor:
        if self.target_grad is None or state.step - self.refreshed_at >= self.refresh_every:
            ids, dataset = resolve_target(state, self.target, self.target_samples)
            self.target_grad = state.signals.target_grad(ids, self.params, dataset=dataset)
            self.refreshed_at = state.step
        dots = state.signals.per_sample_grad_dots(state.candidate_ids, self.target_grad, self.params)
        norms = state.signals.per_sample_grad_norms(state.candidate_ids, self.params) if self.normalize else None
        scores = tracin_scores(dots, norms)
        mask = select_top_loss(scores, state.global_batch_size)
        state.metrics.update({"selector/kept_score_mean": float(scores[mask].mean()),
                              "selector/candidate_score_mean": float(scores.mean())})
        return mask

    def state_dict(self) -> dict:
        return {"target_grad": self.target_grad, "refreshed_at": self.refreshed_at}

    def load_state_dict(self, sd: dict) -> None:
        self.target_grad, self.refreshed_at = sd["target_grad"], sd["refreshed_at"]
