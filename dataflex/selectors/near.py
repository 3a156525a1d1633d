"""Nearest-neighbour selection in a sentence-embedding space (embedding retrieval of target-like
data, as in the kNN baselines of LESS and TSDS, Xia et al. ICML 2024; Liu et al. NeurIPS 2024).

Every pool sample z and target sample z' is embedded by a sentence encoder the user names by local
path (`selector.embedder=PATH`, `minilm` for the packaged all-MiniLM-L6-v2; dataflex.selectors.embedding),
L2-normalised. The score of z is its similarity to the nearest target samples,

    S(z) = mean of the top_k largest cos(e(z), e(z')) over the target set   (top_k = 1: the max),

and the top `keep_fraction` of the pool by S is kept from the first step on, through the
sampler's pool masks; with no mixer, domains are drawn in proportion to what each kept.
"""
from __future__ import annotations

import torch

from dataflex.selectors.embedding import EmbeddingSelector
from dataflex.selectors.less.math import top_fraction


def near_scores(pool: torch.Tensor, target: torch.Tensor, top_k: int = 1, chunk: int = 4096) -> torch.Tensor:
    """[N] float64: mean of the top_k cosine similarities of each pool row to the target rows."""
    t = torch.nn.functional.normalize(target.double(), dim=-1)
    k = min(top_k, len(t))
    out = torch.empty(len(pool), dtype=torch.float64)
    for s in range(0, len(pool), chunk):
        p = torch.nn.functional.normalize(pool[s:s + chunk].double(), dim=-1)
        out[s:s + len(p)] = (p @ t.T).topk(k, dim=1).values.mean(1)
    return out


class NearSelector(EmbeddingSelector):
    SETTINGS = {"top_k": "[1, inf)"}   # checked before any data is read (dataflex.core.settings)
    export_name = "near_selection.json"

    def __init__(self, top_k: int = 1, **kw):
        super().__init__(**kw)
        if top_k < 1:
            raise ValueError(f"selector.top_k must be >= 1, got {top_k}")
        self.top_k = top_k

    def choose(self, pool, target):
        scores = near_scores(pool, target, self.top_k)
        return top_fraction(scores, self.keep_fraction), scores
