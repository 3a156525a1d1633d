"""The data-aware sampler: global batches drawn from the current domain weights.

Every rank holds the same sampler (same seed, same weights, same masks) and so computes the same
global batch with no broadcast; each rank then takes its own contiguous slice. Domains are drawn
per sample from a torch.Generator owned by the sampler; within a domain, samples are visited in a
seeded per-epoch permutation, skipping those a selector's keep mask excludes. `state_dict()` holds
the generator's own state, the cursors and the samples waiting for a packed row (`pending`, see
dataflex.core.packing), so a resumed sampler continues exactly.

Weights come in a unit (`set_weights(w, unit=...)`): `sample` shares are the draw probabilities; `token`
shares (label tokens) are turned into draw probabilities p_d ∝ w_d / L_d with L_d the mean label tokens
of a sample of domain d's pool (`mean_tokens`, from the data's sample lengths), so the expected share of
label tokens drawn from domain d is w_d. `target` keeps the weights as given, `weights` the draw
probabilities, `token_shares()` the expected token share of the current draws.

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
UNITS = ("token", "sample")
MEAN_SAMPLES = 1 << 20
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
                 weights: Optional[Sequence[float]] = None, domain_names: Optional[Sequence[str]] = None,
                 lengths=None):
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
        self.withdrawn: list = []   # waiting samples the last set_pool's masks excluded (never trained)
        self.lengths = lengths      # global ids -> label tokens of each sample (unit=token needs it)
        self._mean: list[Optional[float]] = [None] * len(self.sizes)
        self.unit, self.target = "sample", self.weights
        if weights is not None:
            self.set_weights(weights)

    # -- decisions that plugins feed in -------------------------------------------------------
    def set_weights(self, weights, unit: str = "sample") -> None:
        """Weights in `unit`: `sample` (draw probabilities) or `token` (shares of label tokens)."""
        if unit not in UNITS:
            raise ValueError(f"weight unit must be one of {UNITS}, got {unit!r}")
        w = torch.as_tensor(weights, dtype=torch.float64).flatten().clone()
        if w.numel() != len(self.sizes) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"domain weights must be {len(self.sizes)} finite non-negative numbers "
                             f"with a positive sum, got {w.tolist()}")
        for d in torch.nonzero(w > 0).flatten().tolist():
            if self._bits[d] is not None and self._kept[d] == 0:
                raise ValueError(f"domain {self.names[d]!r} has weight {w[d]:.3g} but its keep mask excludes "
                                 "every sample")
        self.target, self.unit = w / w.sum(), unit
        self.weights = self._draw_probabilities()

    def _draw_probabilities(self) -> torch.Tensor:
        if self.unit == "sample":
            return self.target.clone()
        mean = self.mean_tokens()
        if ((mean <= 0) & (self.target > 0)).any():
            bad = [self.names[d] for d in torch.nonzero((mean <= 0) & (self.target > 0)).flatten().tolist()]
            raise ValueError(f"domain(s) {bad} have token weight but no label tokens")
        p = torch.where(self.target > 0, self.target / mean.clamp(min=1e-12), torch.zeros_like(self.target))
        return p / p.sum()

    def mean_tokens(self) -> torch.Tensor:
        """[K] mean label tokens of a sample of each domain's pool (its kept samples under a keep mask): over
        every sample, or 2^20 evenly spaced ones of a larger pool. Cached until the domain's mask changes."""
        if self.lengths is None:
            raise ValueError("token weights (mixer.unit=token) need the samples' lengths: build the sampler "
                             "with lengths=MixtureDataset.lengths")
        for d in range(len(self.sizes)):
            if self._mean[d] is None:
                local = (np.arange(self.sizes[d], dtype=np.int64) if self._bits[d] is None
                         else np.flatnonzero(np.unpackbits(self._bits[d], count=self.sizes[d])))
                if len(local) > MEAN_SAMPLES:
                    local = local[np.linspace(0, len(local) - 1, MEAN_SAMPLES).astype(np.int64)]
                n = np.asarray(self.lengths(self.offsets[d] + local), dtype=np.float64)
                self._mean[d] = float(n.mean()) if len(n) else 0.0
        return torch.tensor(self._mean, dtype=torch.float64)

    def token_shares(self) -> torch.Tensor:
        """[K] the expected share of label tokens each domain gets under the current draw probabilities."""
        t = self.weights * self.mean_tokens()
        return t / t.sum() if t.sum() > 0 else t

    def set_keep_mask(self, domain: int, mask: Optional[torch.Tensor], check: bool = True) -> None:
        """Restrict a domain to the samples where `mask` is True (None lifts the restriction). Stored as
        a bitset; `keep_mask(domain)` gives it back as a bool tensor. `check=False` skips the check
        against the current weights (`set_pool` checks weights and masks together)."""
        self._mean[domain] = None
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

    def set_pool(self, weights=None, masks: Optional[dict] = None, proportional: bool = False,
                 unit: Optional[str] = None) -> None:
        """New keep masks ({domain: mask | None}) and weights applied together, then validated together:
        a domain whose mask excluded every sample comes back with a new mask and weight in one call.
        `weights=None` keeps the current weights; `proportional=True` sets them to `pool_sizes()` (what
        a run without a mixer draws: each domain in proportion to what it keeps, in samples). `unit`: that
        of `weights` (None: the current one); token weights are converted again after a mask changes the
        pools' mean lengths. On an error nothing changes.

        Samples waiting for a packed row (`pending`) that a new mask excludes are withdrawn: drawn from the
        old pool and never trained, they leave `pending` for `withdrawn` (the ids, until the next call), so a
        selector's new pool holds from the next step on (LESS after its warm-up)."""
        saved = (list(self._bits), list(self._kept), self.weights, self.target, self.unit, list(self._mean))
        try:
            for domain, mask in (masks or {}).items():
                self.set_keep_mask(domain, mask, check=False)
            if proportional:
                weights, unit = self.pool_sizes(), "sample"
            if weights is not None:
                self.set_weights(weights, unit or self.unit)     # checks the weights against the new masks
            elif masks and self.unit == "token":
                self.weights = self._draw_probabilities()
            for d in range(len(self.sizes)):              # the current weights against the new masks
                if self._bits[d] is not None and self._kept[d] == 0 and self.weights[d] > 0:
                    raise ValueError(f"keep mask excludes every sample of domain {self.names[d]!r}, "
                                     "which still has positive weight")
        except Exception:
            self._bits, self._kept, self.weights, self.target, self.unit, self._mean = saved
            raise
        self.withdrawn = []
        if masks and self.pending:
            ids = np.asarray(self.pending, dtype=np.int64)
            d = self.domain_of(torch.from_numpy(ids)).numpy()
            local = ids - np.asarray(self.offsets, dtype=np.int64)[d]
            keep = np.ones(len(ids), dtype=bool)
            for dom in {int(x) for x in masks}:
                where = d == dom
                if where.any() and self._bits[dom] is not None:
                    keep[where] = self._is_kept(dom, local[where])
            self.pending, self.withdrawn = ids[keep].tolist(), ids[~keep].tolist()

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
                "keep_format": "packbits", "pending": list(self.pending), "unit": self.unit,
                "target": self.target.clone()}

    def load_state_dict(self, state: dict) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(f"sampler state is for domain sizes {state['sizes']}, this run has {self.sizes}")
        self.seed = state["seed"]
        self.generator.set_state(state["generator"])
        self.cursor, self.epoch = list(state["cursor"]), list(state["epoch"])
        self.weights = state["weights"].clone()
        self.unit = state.get("unit", "sample")
        self.target = state.get("target", self.weights).clone()
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
        self._mean = [None] * len(self.sizes)
