"""TSDS: distribution matching to the target by optimal transport with a diversity regulariser
(Liu, Karbasi, Rekatsinas; "TSDS: Data Selection for Task-Specific Model Finetuning", NeurIPS 2024),
as the reference code `ZifanL/TSDS` (`tsds.py`) computes it.

TSDS looks for a sampling distribution p over the pool whose optimal-transport distance to the
target set (M query samples, mass 1/M each) is small, with a regulariser that caps how much mass one
candidate may take (diversity) and lowers that cap for candidates in dense regions (kernel density
estimation, so near-duplicates share one cap instead of each taking a full one). The optimal plan has
a closed form through nearest-neighbour search (KNN-KDE): each query sends its mass to its nearest
candidates, filling them in order of distance up to their caps,

    cap(x)   = 1 / (M K rho(x)),
    rho(x)   = sum over the `kde_neighbors` nearest x' of x in U of max(0, 1 - |e(x) - e(x')|^2 / sigma^2),
    gamma_qx = min(cap(x), 1/M - sum of gamma_qx' over the candidates x' nearer to q than x),
    p(x)     = sum_q gamma_qx,

with U the union of the queries' `max_neighbors` nearest candidates (the query neighbourhoods: the
density is estimated among the candidates a query can reach, not over the whole pool), sigma = 0.75
and self included (rho >= 1). sigma = 0 turns the density off (KNN-Uniform). Distances are Euclidean
between L2-normalised sentence embeddings (the reference takes the embeddings as given; sentence
embedders such as MiniLM normalise theirs). Then `keep_fraction` x N draws are made from p WITH
replacement (the reference's np.random.multinomial), seeded; the kept samples are the distinct ones
drawn, and each one's draw count is exported.

Deviations from the reference code, documented:
- K (`neighbors`): the reference trades the transport cost against the regulariser with alpha and C
  and finds the common fill level s (its heap loop); here K = s is given, or, by default, starts at
  2 x kept / M and doubles until p's support holds twice the kept count. For the same s, p is the
  reference's (tests/test_embedding_selectors.py checks it against a transcription).
- The reference caps max_K and kde_K at N / 10 (a speed limit of its faiss index); here they are
  `max_neighbors` and `kde_neighbors` (5000 and 1000, its defaults) capped at N, and exact search.
- Training draws uniformly among the kept samples (the sampler's pool masks are sets), so a sample
  drawn twice is not trained on twice as often, as it is in the reference's output list.
A former dataflex variant (linear kernel 1 - d/0.3 over the whole pool, sampling without replacement)
is gone: on a candidate with six planted near-duplicates (cosine 0.97 to it; `planted_pool` in
tests/test_embedding_selectors.py) it gave the duplicates densities 1.16-1.48 where seven near-copies
should count about 7 (the reference's kernel: 5.85-6.38), so they barely shared a cap.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dataflex.selectors.embedding import EmbeddingSelector


def query_neighbourhoods(pool: torch.Tensor, target: torch.Tensor, max_neighbors: int = 5000,
                         chunk: int = 256) -> torch.Tensor:
    """[M, L] indices of each query's L = min(max_neighbors, N) nearest candidates, nearest first (ties to
    the lower index), on L2-normalised embeddings."""
    x = torch.nn.functional.normalize(pool.double(), dim=-1)
    q = torch.nn.functional.normalize(target.double(), dim=-1)
    L = max(1, min(int(max_neighbors), len(x)))
    parts = []
    for s in range(0, len(q), chunk):
        cost = 1 - q[s:s + chunk] @ x.T                              # monotone in the Euclidean distance
        parts.append(torch.sort(cost, dim=1, stable=True).indices[:, :L])
    return torch.cat(parts)


def kde_density(pool: torch.Tensor, members: Optional[torch.Tensor] = None, sigma: float = 0.75,
                kde_neighbors: int = 1000, chunk: int = 512) -> torch.Tensor:
    """[N] float64: for each candidate in `members` (default: the whole pool), the sum over its
    `kde_neighbors` nearest members (itself included) of max(0, 1 - d^2 / sigma^2), d the Euclidean
    distance of L2-normalised embeddings; 1 outside `members` and everywhere when sigma = 0."""
    N = len(pool)
    out = torch.ones(N, dtype=torch.float64)
    if not sigma or sigma <= 0:
        return out
    members = torch.arange(N) if members is None else torch.as_tensor(members, dtype=torch.long)
    F = torch.nn.functional.normalize(pool.double()[members], dim=-1)
    k = min(int(kde_neighbors), len(F))
    for s in range(0, len(F), chunk):
        d2 = torch.cdist(F[s:s + chunk], F, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        if k < len(F):
            d2 = torch.topk(d2, k, dim=1, largest=False).values
        out[members[s:s + chunk]] = (1 - d2 / sigma ** 2).clamp(min=0).sum(1)
    return out


def tsds_assign(order: torch.Tensor, rho: torch.Tensor, neighbors: float) -> torch.Tensor:
    """[N] float64 summing to 1: each query (a row of `order`, its candidates nearest first) fills its
    candidates up to cap = 1 / (M K rho) until it has sent 1/M (rescaled to 1/M if its neighbourhood
    runs out of capacity). K may be fractional (the reference's fill level s)."""
    M, N = len(order), len(rho)
    cap = 1.0 / (M * float(neighbors) * rho)
    c = cap[order]
    before = c.cumsum(1) - c
    gamma = (1.0 / M - before).clamp(min=0).minimum(c)
    gamma = gamma * (1.0 / M) / gamma.sum(1, keepdim=True).clamp(min=1e-300)
    p = torch.zeros(N, dtype=torch.float64).index_add_(0, order.flatten(), gamma.flatten())
    return p / p.sum()


def tsds_probabilities(pool: torch.Tensor, target: torch.Tensor, neighbors: float, sigma: float = 0.75,
                       max_neighbors: int = 5000, kde_neighbors: int = 1000) -> torch.Tensor:
    """[N] float64 summing to 1: the TSDS sampling distribution (module docstring)."""
    if len(pool) == 0 or len(target) == 0:
        raise ValueError("tsds needs a non-empty pool and target")
    if not neighbors > 0:
        raise ValueError(f"tsds neighbors must be > 0, got {neighbors}")
    order = query_neighbourhoods(pool, target, max_neighbors)
    rho = kde_density(pool, torch.unique(order), sigma, kde_neighbors)
    return tsds_assign(order, rho, neighbors)


def tsds_sample(p: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """[N] long: how often each candidate is drawn in n seeded draws from p with replacement."""
    if n < 1:
        raise ValueError(f"tsds draws n >= 1 samples, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    draws = torch.multinomial(p.double(), n, replacement=True, generator=g)
    return torch.bincount(draws, minlength=len(p))


class TsdsSelector(EmbeddingSelector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"neighbors": "(0, inf)", "sigma": "(0, inf)", "max_neighbors": "[1, inf)",
                "kde_neighbors": "[1, inf)"}
    export_name = "tsds_selection.json"

    def __init__(self, neighbors: Optional[float] = None, sigma: float = 0.75, max_neighbors: int = 5000,
                 kde_neighbors: int = 1000, seed: int = 0, **kw):
        super().__init__(**kw)
        if neighbors is not None and not neighbors > 0:
            raise ValueError(f"selector.neighbors must be > 0 or null, got {neighbors}")
        if sigma < 0 or max_neighbors < 1 or kde_neighbors < 1:
            raise ValueError(f"selector.sigma must be >= 0 and max_neighbors, kde_neighbors >= 1, got {sigma}, "
                             f"{max_neighbors}, {kde_neighbors}")
        self.neighbors, self.sigma, self.seed = neighbors, sigma, seed
        self.max_neighbors, self.kde_neighbors = max_neighbors, kde_neighbors
        self.draws: Optional[torch.Tensor] = None

    def choose(self, pool, target):
        n = max(1, round(self.keep_fraction * len(pool)))
        order = query_neighbourhoods(pool, target, self.max_neighbors)
        rho = kde_density(pool, torch.unique(order), self.sigma, self.kde_neighbors)
        k = self.neighbors or math.ceil(2 * n / len(target))
        p = tsds_assign(order, rho, k)
        while self.neighbors is None and int((p > 0).sum()) < min(order.shape[1], 2 * n) and k < len(pool):
            k = min(len(pool), 2 * k)             # queries share neighbours: widen until the support is 2n
            p = tsds_assign(order, rho, k)
        self.used_neighbors = k
        self.draws = tsds_sample(p, n, self.seed)
        return self.draws > 0, p

    def exports(self, state):
        out = super().exports(state)
        for content in out.values():
            content.update({"neighbors": getattr(self, "used_neighbors", self.neighbors), "sigma": self.sigma,
                            "max_neighbors": self.max_neighbors, "kde_neighbors": self.kde_neighbors,
                            "seed": self.seed,
                            "draws": None if self.draws is None else self.draws[self.kept_ids].tolist(),
                            "note": "scores: the TSDS sampling probability of each kept sample; draws: how "
                                    "often it was drawn (with replacement)"})
        return out

    def state_dict(self):
        return {**super().state_dict(), "used_neighbors": getattr(self, "used_neighbors", None),
                "draws": self.draws}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        if sd.get("used_neighbors") is not None:
            self.used_neighbors = sd["used_neighbors"]
        self.draws = sd.get("draws")
