"""Online Data Mixing with EXP3 (Albalak, Pan, Raffel, Wang, 2023; arXiv 2312.02406), paper form.

Each domain is an arm; the reward of a domain is its training loss in the step (mean over the
global batch's samples from it, times `reward_scale`). With K domains and update count t:

    eps_t      = min(1/K, sqrt(ln K / (K t)))                       (max(., explore_floor) if set)
    pi_t(i)    = (1 - K eps_t) * softmax(eps_{t-1} * R_hat)_i + eps_t
    R_hat_i   <- alpha * R_hat_i + (1 - alpha) * x_i                (variant="paper")
    R_hat_i   <- R_hat_i + x_i                                       (variant="cumulative", the
                                                                     reference code's Exp3WeightUpdater)

so the domain with the highest loss gains weight. The reward estimate x_i (`estimator`):

  count  (default with draw="sample") x_i = R_i * (n_i / B) / pi_i for every domain (0 when absent).
         The sampler draws a domain per sample, so nearly every domain is seen every step; n_i / B
         is then the per-draw indicator that EXP3's importance weight 1/pi_i assumes, averaged over
         the B draws, and E[x_i] = R_i. (Dividing the mean loss by pi_i would multiply a rare
         domain's reward by 1/pi_i whenever it shows up, which it nearly always does.)
  paper  (default with draw="step")   x_i = R_i / pi_i for the domains present, the others unchanged:
         the paper's form, unbiased when one domain is drawn per step.

`draw="step"` is the paper's one-domain-per-micro-batch draw: each step the mixer draws one domain
from pi with its own seeded generator and the batch comes from that domain alone (the sampler gets
its one-hot). Under `apply=loss` the domains are drawn from a fixed q, so q replaces pi in x_i.
`prob_floor` floors pi itself (rescaling the rest; in neither the paper nor DataFlex);
`explore_floor` is DataFlex's (OpenDCAI) floor of 0.03 on the exploration rate eps_t. Both are
opt-in. During `warmup_steps` the initial weights are used and nothing is learnt (the paper warms
up 2000 steps on the Pile's weights).

`variant="cumulative"` has the reference updater's cumulative R_hat but still differs from that code
(`Exp3WeightUpdater` of alon-albalak/online-data-mixing) in three ways, all kept on purpose:
  1. the reference divides every reward by 10 before it enters R_hat; here the reward is the loss times
     `reward_scale` (set `reward_scale=0.1` for the reference's scale);
  2. the reference computes its policy right after an update from that update's eps and the previous
     update's (eps starts at 1/K), so the policy used at update n is built from eps_n and eps_{n-1};
     here the policy for the step after update n uses eps_{n+1} and eps_n: one step later in the
     eps schedule (eps_t is flat at 1/K for the first K ln K updates, so this matters only
     afterwards, and by a factor sqrt(t / (t+1)));
  3. the reference's t is the trainer's global iteration, warm-up included; here t counts the updates
     after `warmup_steps` (so eps decays from 1/K after the warm-up instead of starting lower).
With the default estimator the reward estimate also differs (count-weighted, above; the reference's is
`estimator="paper"` with `draw="step"`).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Mixer
from dataflex.core.state import DataState
from dataflex.mixers.static import WeightSpec, resolve_weights

ESTIMATORS = ("count", "paper")
DRAWS = ("sample", "step")


def exploration_rate(t: int, num_domains: int, floor: float = 0.0) -> float:
    K = num_domains
    return max(min(1.0 / K, math.sqrt(math.log(K) / (K * max(t, 1)))), floor)


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


def exp3_policy(reward_hat: torch.Tensor, eps_prev: float, eps: float, prob_floor: float = 0.0) -> torch.Tensor:
    K = reward_hat.numel()
    pi = (1 - K * eps) * torch.softmax(eps_prev * reward_hat, 0) + eps
    return apply_floor(pi, prob_floor) if prob_floor > 0 else pi


def exp3_estimate(rewards: torch.Tensor, counts: torch.Tensor, probs: torch.Tensor,
                  estimator: str = "count") -> tuple[torch.Tensor, torch.Tensor]:
    """The reward estimate x and the mask of domains it updates. `rewards`: per-domain mean loss (any
    value where absent), `counts`: samples per domain in the batch, `probs`: the distribution the
    domains were drawn from."""
    counts = counts.double()
    if estimator == "count":
        share = counts / counts.sum()
        return torch.where(counts > 0, rewards.double() * share / probs, torch.zeros_like(share)), \
            torch.ones_like(counts, dtype=torch.bool)
    if estimator == "paper":
        return rewards.double() / probs, counts > 0
    raise ValueError(f"bandit estimator must be one of {ESTIMATORS}, got {estimator!r}")


def exp3_update(reward_hat: torch.Tensor, estimate: torch.Tensor, mask: torch.Tensor,
                alpha: float = 0.9, variant: str = "paper") -> torch.Tensor:
    if variant == "paper":
        new = alpha * reward_hat + (1 - alpha) * estimate
    elif variant == "cumulative":
        new = reward_hat + estimate
    else:
        raise ValueError(f"bandit variant must be 'paper' or 'cumulative', got {variant!r}")
    return torch.where(mask, new, reward_hat)


class BanditMixer(Mixer):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"alpha": "(0, 1]", "reward_scale": "(0, inf)", "warmup_steps": "[0, inf)",
                "variant": ('paper', 'cumulative'), "estimator": ('count', 'paper'), "draw": ('sample', 'step'),
                "prob_floor": "[0, 1)", "explore_floor": "[0, 1]", "min_prob": "[0, 1)"}
    def __init__(self, alpha: float = 0.9, reward_scale: float = 1.0, warmup_steps: int = 0,
                 variant: str = "paper", estimator: Optional[str] = None, draw: str = "sample",
                 prob_floor: float = 0.0, explore_floor: float = 0.0, initial_weights: WeightSpec = "uniform",
                 seed: int = 0, min_prob: Optional[float] = None):
        if min_prob is not None:
            raise ValueError("bandit: `min_prob` was renamed `prob_floor` (it floors pi); DataFlex's 0.03 floor "
                             "on the exploration rate is `explore_floor`")
        if variant not in ("paper", "cumulative"):
            raise ValueError(f"bandit variant must be 'paper' or 'cumulative', got {variant!r}")
        if draw not in DRAWS:
            raise ValueError(f"bandit draw must be one of {DRAWS}, got {draw!r}")
        estimator = estimator or ("count" if draw == "sample" else "paper")
        if estimator not in ESTIMATORS:
            raise ValueError(f"bandit estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.alpha, self.reward_scale, self.warmup_steps = alpha, reward_scale, warmup_steps
        self.variant, self.estimator, self.draw = variant, estimator, draw
        self.prob_floor, self.explore_floor, self.initial_weights = prob_floor, explore_floor, initial_weights
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.reward_hat = None
        self.t = 1
        self.policy = None
        self.drawn = None

    def setup(self, state: DataState) -> None:
        if self.draw == "step" and self.apply_to == "loss":
            raise ValueError("bandit: draw=step picks the batch's domain, so it needs apply=sample")
        if self.explore_floor * state.num_domains > 1:
            raise ValueError(f"bandit: explore_floor {self.explore_floor} > 1/K for {state.num_domains} domains")
        self.initial = resolve_weights(self.initial_weights, state.domains, self.domain_sizes(state).tolist())
        if self.reward_hat is None:
            self.reward_hat = torch.zeros(state.num_domains, dtype=torch.float64)

    def weights(self, state: DataState) -> torch.Tensor:
        if state.step < self.warmup_steps:
            self.policy = self.initial
        else:
            K = state.num_domains
            eps = exploration_rate(self.t, K, self.explore_floor)
            eps_prev = exploration_rate(self.t - 1, K, self.explore_floor)
            self.policy = exp3_policy(self.reward_hat, eps_prev, eps, self.prob_floor)
        if self.draw == "step":
            self.drawn = int(torch.multinomial(self.policy, 1, generator=self.generator))
            return torch.nn.functional.one_hot(torch.tensor(self.drawn), len(self.policy)).double()
        return self.policy

    def update(self, event: Event, state: DataState) -> None:
        if event != Event.BATCH_END or state.step < self.warmup_steps:
            return
        K = state.num_domains
        rewards, _ = state.domain_mean(state.losses, state.batch_domains)
        counts = torch.bincount(state.batch_domains, minlength=K)
        probs = self.sampling_distribution(state) if self.apply_to == "loss" else self.policy
        if self.apply_to == "sample" and self.draw == "sample" and self.weight_unit(state) == "token" \
                and state.draw_probabilities is not None:
            probs = state.draw_probabilities    # unit=token: samples are drawn with pi_i / L_i, normalised
        estimate, mask = exp3_estimate(rewards * self.reward_scale, counts, probs, self.estimator)
        self.reward_hat = exp3_update(self.reward_hat, estimate, mask, self.alpha, self.variant)
        self.t += 1
        for d, name in enumerate(state.domains):
            state.metrics[f"bandit/reward_hat/{name}"] = float(self.reward_hat[d])
            state.metrics[f"bandit/pi/{name}"] = float(self.policy[d])

    def state_dict(self) -> dict:
        return {"reward_hat": self.reward_hat, "t": self.t, "policy": self.policy, "drawn": self.drawn,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.reward_hat, self.t, self.policy = state["reward_hat"], state["t"], state["policy"]
        self.drawn = state.get("drawn")
        if "generator" in state:
            self.generator.set_state(state["generator"])
