"""The data-aware sampler: global batches drawn from the current domain weights.

Every rank holds the same sampler (same seed, same weights, same masks) and so computes the same
global batch with no broadcast; each rank then takes its own contiguous slice. Domains are drawn
per sample from a torch.Generator owned by the sampler; within a domain, samples are visited in a
seeded per-epoch permutation, skipping those a selector's keep mask excludes. `state_dict()` holds
the generator's own state and the cursors, so a resumed sampler continues exactly.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

_EPOCH_STRIDE = 1_000_003


class DataAwareSampler:
    def __init__(self, domain_sizes: Sequence[int], seed: int = 0, rank: int = 0, world_size: int = 1,
                 weights: Optional[Sequence[float]] = None, domain_names: Optional[Sequence[str]] = None):
        if any(n <= 0 for n in domain_sizes):
            empty = [domain_names[i] if domain_names else i for i, n in enumerate(domain_sizes) if n <= 0]
            raise ValueError(f"empty domain(s) {empty}: every domain needs at least one sample")
        self.sizes = [int(n) for n in domain_sizes]
        self.names = list(domain_names) if domain_names else [str(i) for i in range(len(self.sizes))]
        self.offsets = [0]
        for n in self.sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.cursor = [0] * len(self.sizes)
        self.epoch = [0] * len(self.sizes)
        self.keep: list[Optional[torch.Tensor]] = [None] * len(self.sizes)
        self._perm: list[Optional[torch.Tensor]] = [None] * len(self.sizes)
        self.weights = torch.full((len(self.sizes),), 1.0 / len(self.sizes), dtype=torch.float64)
        if weights is not None:
            self.set_weights(weights)

    # -- decisions that plugins feed in -------------------------------------------------------
    def set_weights(self, weights) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten().clone()
        if w.numel() != len(self.sizes) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"domain weights must be {len(self.sizes)} finite non-negative numbers "
                             f"with a positive sum, got {w.tolist()}")
        for d in torch.nonzero(w > 0).flatten().tolist():
            if self.keep[d] is not None and not self.keep[d].any():
                raise ValueError(f"domain {self.names[d]!r} has weight {w[d]:.3g} but its keep mask excludes "
                                 "every sample")
        self.weights = w / w.sum()

    def set_keep_mask(self, domain: int, mask: Optional[torch.Tensor]) -> None:
        """Restrict a domain to the samples where `mask` is True (None lifts the restriction)."""
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool).clone()
            if mask.shape != (self.sizes[domain],):
                raise ValueError(f"keep mask for domain {self.names[domain]!r} must have shape "
                                 f"({self.sizes[domain]},), got {tuple(mask.shape)}")
            if not mask.any() and self.weights[domain] > 0:
                raise ValueError(f"keep mask excludes every sample of domain {self.names[domain]!r}, "
                                 "which still has positive weight")
        self.keep[domain] = mask

    # -- drawing --------------------------------------------------------------------------------
    def _permutation(self, d: int) -> torch.Tensor:
        if self._perm[d] is None:
            g = torch.Generator().manual_seed(self.seed + _EPOCH_STRIDE * (1 + d) + 7919 * self.epoch[d])
            self._perm[d] = torch.randperm(self.sizes[d], generator=g)
        return self._perm[d]

    def _next_in_domain(self, d: int) -> int:
        while True:
            if self.cursor[d] >= self.sizes[d]:
                self.epoch[d] += 1
                self.cursor[d] = 0
                self._perm[d] = None
            idx = int(self._permutation(d)[self.cursor[d]])
            self.cursor[d] += 1
            if self.keep[d] is None or self.keep[d][idx]:
                return idx

    def draw(self, n: int) -> torch.Tensor:
        """The next `n` global sample ids (domain offset + index within the domain)."""
        domains = torch.multinomial(self.weights, n, replacement=True, generator=self.generator)
        return torch.tensor([self.offsets[d] + self._next_in_domain(d) for d in domains.tolist()],
                            dtype=torch.long)

    def domain_of(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(ids, torch.tensor(self.offsets[1:]), right=True)

    def local_index(self, ids: torch.Tensor) -> torch.Tensor:
        return ids - torch.tensor(self.offsets)[self.domain_of(ids)]

    def rank_slice(self, global_ids: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
        """This rank's contiguous share; shares of all ranks are disjoint and cover the batch."""
        rank = self.rank if rank is None else rank
        per_rank = -(-len(global_ids) // self.world_size)
        return global_ids[rank * per_rank:(rank + 1) * per_rank]

    def batches(self, global_batch_size: int):
        """Endless local id lists, one per step, usable as a DataLoader `batch_sampler`.

        Ids are drawn when the loader asks for the next batch, so use `num_workers=0`: worker
        prefetch would serve batches drawn from weights that are several steps old.
        """
        while True:
            yield self.rank_slice(self.draw(global_batch_size)).tolist()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"seed": self.seed, "sizes": list(self.sizes), "generator": self.generator.get_state(),
                "cursor": list(self.cursor), "epoch": list(self.epoch), "weights": self.weights.clone(),
                "keep": [None if k is None else k.clone() for k in self.keep]}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"sampler state is for domain sizes {state['sizes']}, this run has {self.sizes}")
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.cursor, self.epoch = list(state["cursor"]), list(state["epoch"])
        self.weights = state["weights"].clone()
        self.keep = [None if k is None else k.clone() for k in state["keep"]]
        self._perm = [None] * len(self.sizes)
