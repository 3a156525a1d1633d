"""The data-aware sampler: global batches drawn from the current domain weights.

Every rank holds the same sampler (same seed, same weights, same masks) and so computes the same
global batch with no broadcast; each rank then takes its own contiguous slice. Domains are drawn
per sample from a torch.Generator owned by the sampler; within a domain, samples are visited in a
seeded per-epoch permutation, skipping those a selector's keep mask excludes. `state_dict()` holds
the generator's own state, the cursors and the samples waiting for a packed row (`pending`, see
dataflex.core.packing), so a resumed sampler continues exactly.

Memory does not grow with a domain's size: the per-epoch permutation is a keyed bijection on
[0, N) (`FeistelPermutation`: a balanced Feistel network on the next even power of two, walked
until it lands inside [0, N)), computed on demand from (seed, domain, epoch), so a domain's state
is a cursor and an epoch. Keep masks are stored as bitsets (N/8 bytes).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

_EPOCH_STRIDE = 1_000_003
_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection on [0, n): `perm(i)` for arrays of positions, O(1) memory.

    A balanced Feistel network on 2h-bit words (2^2h >= n, h >= 1) with `rounds` splitmix64-keyed
    round functions is a permutation of [0, 4^h); cycle-walking (applying it again while the value is
    >= n) restricts it to a permutation of [0, n) (fewer than 4 steps on average, since 4^h < 4n)."""

    def __init__(self, n: int, key: int, rounds: int = 6):
        if n <= 0:
            raise ValueError(f"permutation size must be positive, got {n}")
        self.n = int(n)
        self.half = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        k = np.array([key & (2**64 - 1)], dtype=np.uint64)
        self.keys = []
        for _ in range(rounds):
            k = _mix64(k + _GOLD)
            self.keys.append(k.copy())

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, positions) -> np.ndarray:
        x = np.atleast_1d(np.asarray(positions, dtype=np.uint64)).copy()
        out = self._round_trip(x)
        outside = out >= np.uint64(self.n)
        while outside.any():
            out[outside] = self._round_trip(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def _perm_key(seed: int, domain: int, epoch: int) -> int:
    return (seed + _EPOCH_STRIDE * (1 + domain) + 7919 * epoch) & (2**64 - 1)


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
        self._bounds = torch.tensor(self.offsets[1:], dtype=torch.long)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.cursor = [0] * len(self.sizes)
        self.epoch = [0] * len(self.sizes)
        self._bits: list[Optional[np.ndarray]] = [None] * len(self.sizes)   # packed keep masks
        self._kept = [0] * len(self.sizes)
        self._perm: list[Optional[FeistelPermutation]] = [None] * len(self.sizes)
        self.weights = torch.full((len(self.sizes),), 1.0 / len(self.sizes), dtype=torch.float64)
        self.pending: list = []     # packed layout: samples drawn (and kept) that wait for the next step's rows
        if weights is not None:
            self.set_weights(weights)

    # -- decisions that plugins feed in -------------------------------------------------------
    def set_weights(self, weights) -> None:
        w = torch.as_tensor(weights, dtype=torch.float64).flatten().clone()
        if w.numel() != len(self.sizes) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"domain weights must be {len(self.sizes)} finite non-negative numbers "
                             f"with a positive sum, got {w.tolist()}")
        for d in torch.nonzero(w > 0).flatten().tolist():
            if self._bits[d] is not None and self._kept[d] == 0:
                raise ValueError(f"domain {self.names[d]!r} has weight {w[d]:.3g} but its keep mask excludes "
                                 "every sample")
        self.weights = w / w.sum()

    def set_keep_mask(self, domain: int, mask: Optional[torch.Tensor], check: bool = True) -> None:
        """Restrict a domain to the samples where `mask` is True (None lifts the restriction). Stored as
        a bitset; `keep_mask(domain)` gives it back as a bool tensor. `check=False` skips the check
        against the current weights (`set_pool` checks weights and masks together)."""
        if mask is None:
            self._bits[domain], self._kept[domain] = None, 0
            return
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.sizes[domain],):
            raise ValueError(f"keep mask for domain {self.names[domain]!r} must have shape "
                             f"({self.sizes[domain]},), got {tuple(mask.shape)}")
        kept = int(mask.sum())
        if check and kept == 0 and self.weights[domain] > 0:
            raise ValueError(f"keep mask excludes every sample of domain {self.names[domain]!r}, "
                             "which still has positive weight")
        self._bits[domain], self._kept[domain] = np.packbits(mask.numpy()), kept

    def set_pool(self, weights=None, masks: Optional[dict] = None, proportional: bool = False) -> None:
        """New keep masks ({domain: mask | None}) and weights applied together, then validated together:
        a domain whose mask excluded every sample comes back with a new mask and weight in one call.
        `weights=None` keeps the current weights; `proportional=True` sets them to `pool_sizes()` (what
        a run without a mixer draws: each domain in proportion to what it keeps). On an error nothing
        changes."""
        saved = (list(self._bits), list(self._kept), self.weights)
        try:
            for domain, mask in (masks or {}).items():
                self.set_keep_mask(domain, mask, check=False)
            if proportional:
                weights = self.pool_sizes()
            if weights is not None:
                self.set_weights(weights)                 # checks the weights against the new masks
            for d in range(len(self.sizes)):              # the current weights against the new masks
                if self._bits[d] is not None and self._kept[d] == 0 and self.weights[d] > 0:
                    raise ValueError(f"keep mask excludes every sample of domain {self.names[d]!r}, "
                                     "which still has positive weight")
        except Exception:
            self._bits, self._kept, self.weights = saved
            raise

    def pool_sizes(self) -> list:
        """Samples each domain can draw from: the kept count under a mask, else the domain's size."""
        return [self.sizes[d] if self._bits[d] is None else self._kept[d] for d in range(len(self.sizes))]

    def keep_mask(self, domain: int) -> Optional[torch.Tensor]:
        bits = self._bits[domain]
        if bits is None:
            return None
        return torch.from_numpy(np.unpackbits(bits, count=self.sizes[domain]).astype(bool))

    @property
    def keep(self) -> list:
        """The keep masks as bool tensors (None: the whole domain); built on access."""
        return [self.keep_mask(d) for d in range(len(self.sizes))]

    # -- drawing --------------------------------------------------------------------------------
    def _permutation(self, d: int) -> FeistelPermutation:
        if self._perm[d] is None:
            self._perm[d] = FeistelPermutation(self.sizes[d], _perm_key(self.seed, d, self.epoch[d]))
        return self._perm[d]

    def _is_kept(self, d: int, idx: np.ndarray) -> np.ndarray:
        bits = self._bits[d]
        return ((bits[idx >> 3] >> (7 - (idx & 7)).astype(np.uint8)) & 1).astype(bool)

    def _take(self, d: int, k: int) -> np.ndarray:
        """The next `k` indices of domain `d` in its epoch order, skipping samples the mask excludes."""
        out, size = [], self.sizes[d]
        while k > 0:
            if self.cursor[d] >= size:
                self.epoch[d] += 1
                self.cursor[d] = 0
                self._perm[d] = None
            start = self.cursor[d]
            if self._bits[d] is None:
                block = min(size - start, k)
            else:  # enough positions to expect k kept ones, at least 64, within the epoch
                block = min(size - start, max(64, 2 * k * size // max(self._kept[d], 1)))
            idx = self._permutation(d)(np.arange(start, start + block, dtype=np.uint64))
            if self._bits[d] is None:
                self.cursor[d] += block
            else:
                hits = np.flatnonzero(self._is_kept(d, idx))[:k]
                self.cursor[d] = start + (int(hits[-1]) + 1 if len(hits) == k else block)
                idx = idx[hits]
            out.append(idx)
            k -= len(idx)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def draw(self, n: int) -> torch.Tensor:
        """The next `n` global sample ids (domain offset + index within the domain)."""
        domains = torch.multinomial(self.weights, n, replacement=True, generator=self.generator).numpy()
        ids = np.empty(n, dtype=np.int64)
        for d in np.unique(domains).tolist():
            where = domains == d
            ids[where] = self.offsets[d] + self._take(d, int(where.sum()))
        return torch.from_numpy(ids)

    def domain_of(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(torch.as_tensor(ids), self._bounds, right=True)

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
        """Seed, generator, cursors, epochs, weights and the keep masks as packed bits (uint8 tensors)."""
        return {"seed": self.seed, "sizes": list(self.sizes), "generator": self.generator.get_state(),
                "cursor": list(self.cursor), "epoch": list(self.epoch), "weights": self.weights.clone(),
                "keep": [None if b is None else torch.from_numpy(b.copy()) for b in self._bits],
                "keep_format": "packbits", "pending": list(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"sampler state is for domain sizes {state['sizes']}, this run has {self.sizes}")
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.cursor, self.epoch = list(state["cursor"]), list(state["epoch"])
        self.weights = state["weights"].clone()
        self.pending = [int(i) for i in state.get("pending", [])]
        self._bits, self._kept = [None] * len(self.sizes), [0] * len(self.sizes)
        for d, k in enumerate(state["keep"]):
            if k is None:
                continue
            if k.dtype == torch.bool:  # a bool mask (states written before masks were packed)
                k = torch.from_numpy(np.packbits(k.numpy()))
            bits = k.numpy().astype(np.uint8).copy()
            self._bits[d] = bits
            self._kept[d] = int(np.unpackbits(bits, count=self.sizes[d]).sum())
        self._perm = [None] * len(self.sizes)
