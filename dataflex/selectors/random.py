"""Random selection: keep a uniformly random `keep_fraction` of each candidate batch, or of the pool.

The baseline every selector is compared with, in two scopes:
  scope=batch  the same candidate batch size as the online selectors (loss, rho, gradnorm, tracin),
               so the same draws from the sampler, and no signal at all;
  scope=pool   a fixed random keep_fraction of the whole pool, set through the sampler's pool masks
               before the first draw: the baseline of the pool selectors (less, near, tsds,
               cluster_less), which train on a kept fraction of the pool.
The mask comes from the selector's own generator, seeded by the run's seed (and the step), so every
rank keeps the same samples and a resumed run keeps what the uninterrupted run kept.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Selector
from dataflex.core.state import DataState, keep_pool


def select_random(n: int, k: int, seed: int, step: int) -> torch.Tensor:
    """Boolean mask of k of n candidates, a function of (seed, step) only."""
    if not 0 < k <= n:
        raise ValueError(f"cannot keep {k} of {n} candidates")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[:k]] = True
    return mask


def random_pool(n: int, keep_fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask keeping round(keep_fraction * n) (at least 1) of a pool of n, from the seed only."""
    return select_random(n, max(1, round(keep_fraction * n)), seed, step=-1)


class RandomSelector(Selector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "scope": ('batch', 'pool')}
    def __init__(self, keep_fraction: float = 0.5, seed: int = 0, scope: str = "batch"):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        if scope not in ("batch", "pool"):
            raise ValueError(f"selector.scope must be 'batch' or 'pool', got {scope!r}")
        self.keep_fraction, self.seed, self.scope = keep_fraction, seed, scope
        self.candidate_factor = 1.0 / keep_fraction if scope == "batch" else 1.0
        if scope == "pool":
            self.events = (Event.BEFORE_SAMPLE, Event.AFTER_CANDIDATES)
        self.pool_counts: Optional[list] = None

    def apply(self, event, state: DataState) -> None:
        if event == Event.BEFORE_SAMPLE:
            if self.pool_counts is None:
                self.pool_counts = keep_pool(state, random_pool(sum(state.domain_sizes), self.keep_fraction, self.seed))
            for name, n in zip(state.domains, self.pool_counts):
                state.metrics[f"selector/kept/{name}"] = n
        else:
            super().apply(event, state)

    def select(self, state: DataState) -> torch.Tensor:
        if self.scope == "pool":                      # the pool masks did the selecting
            return torch.ones(len(state.candidate_ids), dtype=torch.bool)
        return select_random(len(state.candidate_ids), state.global_batch_size, self.seed, state.step)

    def state_dict(self) -> dict:
        return {"pool_counts": self.pool_counts}

    def load_state_dict(self, state: dict) -> None:
        self.pool_counts = state.get("pool_counts")
