"""DoReMi: domain reweighting with minimax optimisation (Xie et al., NeurIPS 2023), online.

A proxy model trains on batches drawn from reference weights alpha_ref while a frozen reference
model (trained on alpha_ref: an earlier dataflex run, `reference=RUN_DIR`) scores the same tokens.
Each step, with per-token losses l_theta and l_ref of the global batch:

    lambda_i  = sum_{tokens of domain i} max(l_theta - l_ref, 0) / #tokens of domain i
                (a domain absent from the batch keeps its previous lambda)
    alpha'    ∝ alpha_{t-1} * exp(eta * lambda)          (in log space)
    alpha_t   = (1 - c) alpha' + c / K
    loss      = sum_tokens (alpha[d] / alpha_ref[d]) l / sum_tokens (alpha[d] / alpha_ref[d])

The loss weighting is dataflex's `apply=loss` with q = alpha_ref (token reduction). The output
is the average alpha_bar = mean_t alpha_t, written at the end of the run as `mixture.json` in the
run folder: the static mixture a later run trains on (`+mixer=static mixer.weights=RUN/mixture.json`).

Defaults: eta = 1, c = 1e-3 (the run script; the dataclass default is 1e-4). Difference from the
reference trainer, which updates alpha before computing the step's loss: here the step's loss uses
alpha_{t-1} (the weights are fixed when the batch is drawn) and alpha_t is learnt at BATCH_END.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Mixer
from dataflex.core.state import DataState
from dataflex.grad.interface import as_reference
from dataflex.mixers.static import WeightSpec, resolve_weights


def excess_loss(token_losses: torch.Tensor, reference_losses: torch.Tensor, token_mask: torch.Tensor,
                domains: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """[K] per-domain mean over label tokens of max(l - l_ref, 0); absent domains keep `previous`."""
    K = previous.numel()
    clipped = (token_losses.double() - reference_losses.double()).clamp(min=0) * token_mask.double()
    sums = torch.zeros(K, dtype=torch.float64).index_add_(0, domains, clipped.sum(-1))
    counts = torch.zeros(K, dtype=torch.float64).index_add_(0, domains, token_mask.double().sum(-1))
    return torch.where(counts > 0, sums / counts.clamp(min=1), previous.double())


def doremi_update(alpha: torch.Tensor, excess: torch.Tensor, eta: float = 1.0, smoothing: float = 1e-3) -> torch.Tensor:
    """One exponentiated-gradient step on the domain weights, then smoothing towards uniform."""
    logits = torch.log(alpha.double()) + eta * excess.double()
    new = torch.softmax(logits, 0)
    return (1 - smoothing) * new + smoothing / alpha.numel()


class DoReMiMixer(Mixer):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"eta": "(0, inf)", "smoothing": "[0, 1]", "apply": ('sample', 'loss')}
    needs_token_losses = True

    def __init__(self, reference=None, reference_weights: WeightSpec = "uniform", eta: float = 1.0,
                 smoothing: float = 1e-3, apply: str = "loss"):
        if reference is None:
            raise ValueError("doremi needs a reference model: mixer.reference=RUN_DIR (an earlier run trained on "
                             "the reference weights with trainer.checkpoint_every)")
        if apply not in ("sample", "loss"):
            raise ValueError(f"mixer.apply must be 'sample' or 'loss', got {apply!r}")
        self.reference_spec, self.reference = reference, None
        self.reference_weights, self.eta, self.smoothing, self.apply_to = reference_weights, eta, smoothing, apply
        self.alpha_ref: Optional[torch.Tensor] = None
        self.alpha: Optional[torch.Tensor] = None
        self.excess: Optional[torch.Tensor] = None
        self.alpha_sum: Optional[torch.Tensor] = None
        self.updates = 0

    def setup(self, state: DataState) -> None:
        self.alpha_ref = resolve_weights(self.reference_weights, state.domains, self.domain_sizes(state).tolist())
        if self.alpha is None:
            self.alpha = self.alpha_ref.clone()
            self.excess = torch.zeros(state.num_domains, dtype=torch.float64)
            self.alpha_sum = torch.zeros(state.num_domains, dtype=torch.float64)

    def sampling_distribution(self, state: DataState) -> torch.Tensor:
        return self.alpha_ref

    def weights(self, state: DataState) -> torch.Tensor:
        return self.alpha

    def update(self, event: Event, state: DataState) -> None:
        if event != Event.BATCH_END:
            return
        if self.reference is None:
            self.reference = as_reference(self.reference_spec)
        ref = state.signals.probe(state.batch_ids, output="token_loss", interface=self.reference)
        self.excess = excess_loss(state.token_losses, ref, state.token_mask, state.batch_domains, self.excess)
        self.alpha = doremi_update(self.alpha, self.excess, self.eta, self.smoothing)
        self.alpha_sum += self.alpha
        self.updates += 1
        for i, d in enumerate(state.domains):
            state.metrics[f"doremi/excess/{d}"] = float(self.excess[i])
            state.metrics[f"doremi/alpha/{d}"] = float(self.alpha[i])

    def average(self) -> torch.Tensor:
        return self.alpha_sum / self.updates if self.updates else self.alpha_ref

    def exports(self, state: DataState) -> dict:
        return {"mixture.json": {d: float(w) for d, w in zip(state.domains, self.average())}}

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "excess": self.excess, "alpha_sum": self.alpha_sum, "updates": self.updates}

    def load_state_dict(self, sd: dict) -> None:
        self.alpha, self.excess, self.alpha_sum, self.updates = sd["alpha"], sd["excess"], sd["alpha_sum"], sd["updates"]
