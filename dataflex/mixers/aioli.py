"""Aioli: online mixing via a learned linear mixing law (Chen, Hu, Lourie, Cho, Ré; ICLR 2025).

Mixing law: L_i^{t+1}(p) = L_i^t - sum_j A^t_ij p_j, with A fitted online. Each round of
`update_steps` steps (the reference trainer's `learn_params_subroutine` and `train`):

1. LearnParams. L_prev = validation losses. For r = 1..R (`lp_rounds`), for j in a fresh random
   permutation of the K domains: train S (`lp_steps`) real optimizer steps on the mixture
   q^(j) = f e_j + (1 - f)/(K - 1) (1 - e_j) (f = `one_hot_factor`), evaluate L_new,
   A_hat[:, j] += L_prev - L_new, L_prev = L_new. Then A_hat /= R, and if f < 1 each row is
   unmixed: A[i, :] = W^-1 A_hat[i, :], row j of W being q^(j).
2. Normalise: if min A < 0, A <- A - min A; then A <- A / sum(A).
3. Exponentiated gradient: p^t ∝ p^{t-1} exp(eta sum_i A_ij) (the first round from uniform); with
   `ema` gamma: A_bar = (1 - gamma) A + gamma A_bar_prev, p^t ∝ exp(eta sum_i A_bar_ij) from uniform.
4. Train on p^t for the rest of the round. The R K S LearnParams steps are ordinary steps of the run:
   they go through the sampler (the mixer sets the weights to q^(j)), count toward trainer.max_steps
   and appear in the ledger.
5. Restricted mode: `prior` weights for `prior_steps` first, then the dynamic stage (EG base uniform).

Validation losses come from probe inference on the run's validation set (`state.signals.val_loss`,
the first `val_samples` of each domain when set), at the start of each round and after each
LearnParams mixture: K R + 1 evaluations per round. The permutations come from the mixer's own
seeded generator, so every rank runs the same schedule.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Mixer
from dataflex.core.state import DataState
from dataflex.mixers.static import WeightSpec, resolve_weights


def aioli_mixtures(K: int, one_hot_factor: float) -> torch.Tensor:
    """W: row j is q^(j) = f e_j + (1 - f)/(K - 1) off the diagonal."""
    f = one_hot_factor
    W = torch.full((K, K), (1 - f) / (K - 1), dtype=torch.float64)
    W.fill_diagonal_(f)
    return W


def aioli_unmix(A_hat: torch.Tensor, one_hot_factor: float) -> torch.Tensor:
    """A[i, :] = W^-1 A_hat[i, :] (identity when f = 1)."""
    if one_hot_factor == 1:
        return A_hat.clone()
    W = aioli_mixtures(A_hat.shape[0], one_hot_factor)
    return torch.linalg.solve(W, A_hat.double().T).T


def aioli_normalize(A: torch.Tensor) -> torch.Tensor:
    A = A.double()
    if A.min() < 0:
        A = A - A.min()
    total = A.sum()
    return A / total if total > 0 else torch.full_like(A, 1.0 / A.numel())


def aioli_eg_step(p_prev: torch.Tensor, A: torch.Tensor, eta: float) -> torch.Tensor:
    """p ∝ p_prev * exp(eta * column sums of A)."""
    logits = torch.log(p_prev.double()) + eta * A.double().sum(0)
    return torch.softmax(logits, 0)


class AioliMixer(Mixer):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"eta": "(0, inf)", "lp_rounds": "[1, inf)", "lp_steps": "[1, inf)", "one_hot_factor": "(0, 1]",
                "update_steps": "[1, inf)", "ema": "[0, 1)", "prior_steps": "[0, inf)", "val_samples": "[1, inf)"}
    def __init__(self, eta: float = 0.5, lp_rounds: int = 2, lp_steps: int = 4, one_hot_factor: float = 0.75,
                 update_steps: int = 100, ema: Optional[float] = 0.1, prior: Optional[WeightSpec] = None,
                 prior_steps: int = 0, normalize: bool = True, val_samples: Optional[int] = None, seed: int = 0):
        if not 0 < one_hot_factor <= 1:
            raise ValueError(f"aioli one_hot_factor must be in (0, 1], got {one_hot_factor}")
        if prior_steps and prior is None:
            raise ValueError("aioli: prior_steps needs prior weights (mixer.prior)")
        self.eta, self.lp_rounds, self.lp_steps, self.f = eta, lp_rounds, lp_steps, one_hot_factor
        self.update_steps, self.ema, self.prior_spec, self.prior_steps = update_steps, ema, prior, prior_steps
        self.normalize, self.val_samples = normalize, val_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.p: Optional[torch.Tensor] = None
        self.A_hat = self.A = self.A_bar = self.L_prev = self.order = None
        self.rounds = 0

    def setup(self, state: DataState) -> None:
        K = state.num_domains
        if K < 2:
            raise ValueError("aioli needs at least 2 domains")
        self.lp_duration = self.lp_rounds * K * self.lp_steps
        if self.update_steps <= self.lp_duration:
            raise ValueError(f"aioli: update_steps ({self.update_steps}) must exceed the LearnParams steps "
                             f"lp_rounds * K * lp_steps = {self.lp_duration}")
        self.W = aioli_mixtures(K, self.f)
        self.prior = resolve_weights(self.prior_spec, state.domains, self.domain_sizes(state).tolist()) \
            if self.prior_spec is not None else None
        if self.p is None:
            self.p = torch.full((K,), 1.0 / K, dtype=torch.float64)

    def phase(self, step: int) -> tuple[str, int]:
        """('prior' | 'learn' | 'train', position in the round)."""
        dyn = step - self.prior_steps
        if dyn < 0:
            return "prior", dyn
        pos = dyn % self.update_steps
        return ("learn" if pos < self.lp_duration else "train"), pos

    def val_loss(self, state: DataState) -> torch.Tensor:
        loss = state.signals.val_loss(max_per_domain=self.val_samples)
        if torch.isnan(loss).any():
            missing = [d for d, x in zip(state.domains, loss.tolist()) if x != x]
            raise RuntimeError(f"aioli needs validation data for every domain; none for {missing}")
        return loss

    def weights(self, state: DataState) -> torch.Tensor:
        phase, pos = self.phase(state.step)
        state.metrics["aioli/phase"] = {"prior": 0, "learn": 1, "train": 2}[phase]
        if phase == "prior":
            return self.prior
        if phase == "train":
            return self.p
        K = state.num_domains
        if pos == 0:                       # a round starts: L_prev and a fresh schedule of mixtures
            self.L_prev = self.val_loss(state)
            self.A_hat = torch.zeros(K, K, dtype=torch.float64)
            self.order = torch.cat([torch.randperm(K, generator=self.generator) for _ in range(self.lp_rounds)])
        j = int(self.order[pos // self.lp_steps])
        return self.W[j]

    def update(self, event: Event, state: DataState) -> None:
        if event != Event.BATCH_END:
            return
        phase, pos = self.phase(state.step)
        if phase != "learn" or (pos + 1) % self.lp_steps:
            return
        j = int(self.order[pos // self.lp_steps])
        L_new = self.val_loss(state)
        self.A_hat[:, j] += self.L_prev - L_new
        self.L_prev = L_new
        if pos + 1 == self.lp_duration:
            self.finish_round(state)

    def finish_round(self, state: DataState) -> None:
        A = aioli_unmix(self.A_hat / self.lp_rounds, self.f)
        self.A = aioli_normalize(A) if self.normalize else A
        if self.ema is not None:
            self.A_bar = self.A if self.A_bar is None else (1 - self.ema) * self.A + self.ema * self.A_bar
            uniform = torch.full_like(self.p, 1.0 / len(self.p))
            self.p = aioli_eg_step(uniform, self.A_bar, self.eta)
        else:
            base = torch.full_like(self.p, 1.0 / len(self.p)) if self.rounds == 0 else self.p
            self.p = aioli_eg_step(base, self.A, self.eta)
        self.rounds += 1
        for i, di in enumerate(state.domains):
            state.metrics[f"aioli/p/{di}"] = float(self.p[i])
            for j, dj in enumerate(state.domains):
                state.metrics[f"aioli/A/{di}/{dj}"] = float(self.A[i, j])

    def state_dict(self) -> dict:
        return {"p": self.p, "A_hat": self.A_hat, "A": self.A, "A_bar": self.A_bar, "L_prev": self.L_prev,
                "order": self.order, "rounds": self.rounds, "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        self.p, self.A_hat, self.A, self.A_bar = sd["p"], sd["A_hat"], sd["A"], sd["A_bar"]
        self.L_prev, self.order, self.rounds = sd["L_prev"], sd["order"], sd["rounds"]
        self.generator.set_state(sd["generator"])
