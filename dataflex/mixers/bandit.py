"""Online Data Mixing with EXP3 (Albalak, Pan, Raffel, Wang, 2023; arXiv 2312.02406), paper form.

Each domain is an arm; the reward of a domain is its training loss in the step (mean over the
global batch's samples from it, times `reward_scale`). With K domains and update count t:

    eps_t      = min(1/K, sqrt(ln K / (K t)))
    pi_t(i)    = (1 - K eps_t) * softmax(eps_{t-1} * R_hat)_i + eps_t
    R_hat_i   <- alpha * R_hat_i + (1 - alpha) * R_i / pi_t(i)     for each domain i in the batch

so the domain with the highest loss gains weight. `variant="cumulative"` is the reference code's
Exp3WeightUpdater (R_hat_i += R_i / pi_t(i)); `min_prob` is DataFlex's opt-in floor (0.03 there),
not in the paper. During `warmup_steps` the initial weights are used and nothing is learnt
(the paper warms up 2000 steps on the Pile's weights).
"""
from __future__ import annotations

import math

import torch

from ..events import Event
from ..plugin import Mixer
from ..state import DataState
from .static import WeightSpec, resolve_weights


def exploration_rate(t: int, num_domains: int) -> float:
    K = num_domains
    return min(1.0 / K, math.sqrt(math.log(K) / (K * max(t, 1))))


def apply_floor(p: torch.Tensor, floor: float) -> torch.Tensor:
    """Raise every probability below `floor` to it, scaling the others down to keep the sum at 1
    (repeated, since scaling can push another one under the floor)."""
    if floor * p.numel() > 1:
        raise ValueError(f"a floor of {floor} is impossible for {p.numel()} domains")
    p, fixed = p.clone(), torch.zeros_like(p, dtype=torch.bool)
    while True:
        low = (p < floor) & ~fixed
        if not low.any():
            return p
        fixed |= low
        p[fixed] = floor
        p[~fixed] *= (1 - floor * int(fixed.sum())) / p[~fixed].sum()


def exp3_policy(reward_hat: torch.Tensor, eps_prev: float, eps: float, min_prob: float = 0.0) -> torch.Tensor:
    K = reward_hat.numel()
    pi = (1 - K * eps) * torch.softmax(eps_prev * reward_hat, 0) + eps
    return apply_floor(pi, min_prob) if min_prob > 0 else pi


def exp3_update(reward_hat: torch.Tensor, rewards: torch.Tensor, present: torch.Tensor, policy: torch.Tensor,
                alpha: float = 0.9, variant: str = "paper") -> torch.Tensor:
    estimate = rewards / policy
    if variant == "paper":
        new = alpha * reward_hat + (1 - alpha) * estimate
    elif variant == "cumulative":
        new = reward_hat + estimate
    else:
        raise ValueError(f"bandit variant must be 'paper' or 'cumulative', got {variant!r}")
    return torch.where(present, new, reward_hat)


class BanditMixer(Mixer):
    def __init__(self, alpha: float = 0.9, reward_scale: float = 1.0, warmup_steps: int = 0,
                 variant: str = "paper", min_prob: float = 0.0, initial_weights: WeightSpec = "uniform"):
        if variant not in ("paper", "cumulative"):
            raise ValueError(f"bandit variant must be 'paper' or 'cumulative', got {variant!r}")
        self.alpha, self.reward_scale, self.warmup_steps = alpha, reward_scale, warmup_steps
        self.variant, self.min_prob, self.initial_weights = variant, min_prob, initial_weights
        self.reward_hat = None
        self.t = 1
        self.policy = None

    def setup(self, state: DataState) -> None:
        self.initial = resolve_weights(self.initial_weights, state.domains, state.domain_sizes)
        if self.reward_hat is None:
            self.reward_hat = torch.zeros(state.num_domains, dtype=torch.float64)

    def weights(self, state: DataState) -> torch.Tensor:
        if state.step < self.warmup_steps:
            self.policy = self.initial
        else:
            K = state.num_domains
            eps, eps_prev = exploration_rate(self.t, K), exploration_rate(self.t - 1, K)
            self.policy = exp3_policy(self.reward_hat, eps_prev, eps, self.min_prob)
        return self.policy

    def update(self, event: Event, state: DataState) -> None:
        if event != Event.BATCH_END or state.step < self.warmup_steps:
            return
        rewards, present = state.domain_mean(state.losses, state.batch_domains)
        self.reward_hat = exp3_update(self.reward_hat, rewards * self.reward_scale, present, self.policy,
                                      self.alpha, self.variant)
        self.t += 1
        for d, name in enumerate(state.domains):
            state.metrics[f"bandit/reward_hat/{name}"] = float(self.reward_hat[d])

    def state_dict(self) -> dict:
        return {"reward_hat": self.reward_hat, "t": self.t, "policy": self.policy}

    def load_state_dict(self, state: dict) -> None:
        self.reward_hat, self.t, self.policy = state["reward_hat"], state["t"], state["policy"]
