"""TSDS: distribution matching to the target by optimal transport with a diversity regulariser
(Liu, Karbasi, Rekatsinas; "TSDS: Data Selection for Task-Specific Model Finetuning", NeurIPS 2024).

TSDS looks for a sampling distribution p over the pool whose optimal-transport distance to the
target set (M query samples, mass 1/M each, cost c(q, x) = 1 - cos(e(q), e(x)) in a sentence-
embedding space) is small, with a regulariser that caps how much mass one candidate may take
(diversity) and lowers that cap for candidates in dense regions (kernel density estimation, so
near-duplicates share one cap instead of each taking a full one). The optimal plan has a closed
form through nearest-neighbour search (the paper's KNN-Uniform and KNN-KDE): each query sends its
mass to its nearest candidates, filling them in order of cost up to their caps,

    cap(x)   = 1 / (M K rho(x)),   rho(x) = sum_{x' in pool} max(0, 1 - |e(x) - e(x')| / h)  (>= 1),
    gamma_qx = min(cap(x), 1/M - sum of gamma_qx' over the candidates x' nearer to q than x),
    p(x)     = sum_q gamma_qx,

so with no near-duplicates (rho = 1) every query spreads 1/M evenly over its K nearest candidates
(KNN-Uniform), and a cluster of r near-duplicates takes about what one candidate would (KNN-KDE).
`kde_bandwidth` h = 0 turns the density off. Then `keep_fraction` of the pool is sampled from p
without replacement with a seeded generator (TSDS samples its subset from p); where p has fewer
non-zero entries than that, all of them are kept and the rest filled by similarity to the nearest
target sample. By default K starts at 2 x kept / M and doubles until p's support holds twice the
kept count (queries share neighbours).

Deviation: the paper trades the transport cost against the regulariser with a weight alpha that
sets K; here K (`neighbors`) is given directly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from dataflex.selectors.embedding import EmbeddingSelector
from dataflex.selectors.near import near_scores


def kde_density(pool: torch.Tensor, bandwidth: float, chunk: int = 1024) -> torch.Tensor:
    """[N] float64: sum over the pool of the linear kernel max(0, 1 - distance / h) (self included)."""
    if not bandwidth or bandwidth <= 0:
        return torch.ones(len(pool), dtype=torch.float64)
    x = torch.nn.functional.normalize(pool.double(), dim=-1)
    out = torch.empty(len(x), dtype=torch.float64)
    for s in range(0, len(x), chunk):
        d = torch.cdist(x[s:s + chunk], x)
        out[s:s + chunk] = (1 - d / bandwidth).clamp(min=0).sum(1)
    return out.clamp(min=1.0)


def tsds_probabilities(pool: torch.Tensor, target: torch.Tensor, neighbors: int, kde_bandwidth: float = 0.0,
                       chunk: int = 256) -> torch.Tensor:
    """[N] float64 summing to 1: the TSDS sampling distribution (module docstring)."""
    N, M = len(pool), len(target)
    if N == 0 or M == 0:
        raise ValueError("tsds needs a non-empty pool and target")
    K = max(1, min(int(neighbors), N))
    rho = kde_density(pool, kde_bandwidth)
    cap = 1.0 / (M * K * rho)                                    # [N]
    L = min(N, max(K, math.ceil(K * float(rho.max())) + 1))      # candidates a query can reach
    x = torch.nn.functional.normalize(pool.double(), dim=-1)
    q = torch.nn.functional.normalize(target.double(), dim=-1)
    p = torch.zeros(N, dtype=torch.float64)
    for s in range(0, M, chunk):
        cost = 1 - q[s:s + chunk] @ x.T                          # [m, N]
        order = torch.sort(cost, dim=1, stable=True).indices[:, :L]
        c = cap[order]                                           # caps in order of cost
        before = c.cumsum(1) - c
        gamma = (1.0 / M - before).clamp(min=0).minimum(c)
        total = gamma.sum(1, keepdim=True)
        gamma = gamma * (1.0 / M) / total.clamp(min=1e-300)      # short of capacity: rescale to 1/M
        p.index_add_(0, order.flatten(), gamma.flatten())
    return p / p.sum()


def tsds_sample(p: torch.Tensor, n: int, seed: int, fallback: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N] bool: n samples drawn from p without replacement (seeded); when p has fewer than n
    non-zero entries, all of them and the rest by `fallback` score (ties to the lower index)."""
    N = len(p)
    if not 0 < n <= N:
        raise ValueError(f"cannot keep {n} of {N} samples")
    keep = torch.zeros(N, dtype=torch.bool)
    support = p > 0
    if int(support.sum()) >= n:
        g = torch.Generator().manual_seed(int(seed))
        keep[torch.multinomial(p.double(), n, replacement=False, generator=g)] = True
        return keep
    keep |= support
    rest = torch.where(support, torch.full_like(p, -math.inf),
                       (fallback if fallback is not None else torch.zeros(N)).double())
    keep[torch.sort(-rest, stable=True).indices[:n - int(support.sum())]] = True
    return keep


class TsdsSelector(EmbeddingSelector):
    export_name = "tsds_selection.json"

    def __init__(self, neighbors: Optional[int] = None, kde_bandwidth: float = 0.3, seed: int = 0, **kw):
        super().__init__(**kw)
        if neighbors is not None and neighbors < 1:
            raise ValueError(f"selector.neighbors must be >= 1 or null, got {neighbors}")
        self.neighbors, self.kde_bandwidth, self.seed = neighbors, kde_bandwidth, seed

    def choose(self, pool, target):
        n = max(1, round(self.keep_fraction * len(pool)))
        k = self.neighbors or math.ceil(2 * n / len(target))
        p = tsds_probabilities(pool, target, k, self.kde_bandwidth)
        while self.neighbors is None and int((p > 0).sum()) < min(len(pool), 2 * n) and k < len(pool):
            k = min(len(pool), 2 * k)             # queries share neighbours: widen until the support is 2n
            p = tsds_probabilities(pool, target, k, self.kde_bandwidth)
        self.used_neighbors = k
        return tsds_sample(p, n, self.seed, near_scores(pool, target)), p

    def exports(self, state):
        out = super().exports(state)
        for content in out.values():
            content.update({"neighbors": getattr(self, "used_neighbors", self.neighbors),
                            "kde_bandwidth": self.kde_bandwidth, "seed": self.seed,
                            "note": "scores: the TSDS sampling probability of each kept sample"})
        return out

    def state_dict(self):
        return {**super().state_dict(), "used_neighbors": getattr(self, "used_neighbors", None)}

    def load_state_dict(self, sd):
        super().load_state_dict(sd)
        if sd.get("used_neighbors") is not None:
            self.used_neighbors = sd["used_neighbors"]
