"""Cluster-LESS: LESS gradients for a few representatives of each embedding cluster, the cluster's
score given to its members (LESS: Xia, Malladi, Gururangan, Arora, Chen; ICML 2024, with the
pool clustered in a sentence-embedding space to cut its per-sample gradient cost).

1. Cluster. At the first step the pool is embedded by a sentence encoder named by local path
   (`selector.embedder`, dataflex.selectors.embedding) and split into `clusters` groups by seeded k-means
   (k-means++ start, Lloyd iterations, Euclidean on the unit-normalised embeddings). The
   `representatives` members nearest each centroid stand for their cluster.
2. LESS (dataflex.selectors.less, unchanged): warm-up on a random fraction, and at each checkpoint
   i the Adam features of the representatives only, cosines with the target subtasks' SGD
   features, weighted by the checkpoints' learning rates, max over subtasks. A cluster's per-
   checkpoint cosines are the mean of its representatives',

       cos_i(c, j) = mean_{r in reps(c)} cos_i(r, j),   cos_i(z, j) = cos_i(cluster(z), j) for every member z,

   so every member of a cluster gets the cluster's score S(c) = max_j sum_i eta_i cos_i(c, j).
3. Select the top `keep_fraction` of the pool by that score (whole clusters, the last one cut at
   the lower sample ids), through the pool masks, as LESS does.

Per checkpoint the pool costs clusters x representatives per-sample gradients instead of N.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.state import DataState
from dataflex.selectors.embedding import (
    cached_embeddings,
    check_vocab,
    embedder_path,
    load_embedder,
    run_tokenizer,
    sample_texts,
)
from dataflex.selectors.less.plugin import LessSelector
from dataflex.utils import dist


def kmeans(x: torch.Tensor, k: int, iters: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(centroids [k, d], labels [N]) of seeded k-means (k-means++ start, Lloyd iterations) on the
    rows of x, float64; the same for the same (x, k, iters, seed). An emptied cluster restarts at
    the point farthest from its centroid."""
    x = x.double()
    N = len(x)
    k = max(1, min(int(k), N))
    g = torch.Generator().manual_seed(int(seed))
    centroids = x[torch.randint(N, (1,), generator=g)]
    d2 = torch.cdist(x, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full((N,), 1.0 / N, dtype=torch.float64)
        nxt = torch.multinomial(probs, 1, generator=g)
        centroids = torch.cat([centroids, x[nxt]])
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    labels = torch.full((N,), -1, dtype=torch.long)
    for _ in range(max(1, iters)):
        dist_ = torch.cdist(x, centroids)
        new = dist_.argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).double()
        for c in torch.nonzero(counts == 0).flatten().tolist():
            far = int((x - centroids[labels]).norm(dim=1).argmax())
            centroids[c] = x[far]
            labels[far] = c
    return centroids, labels


def representatives(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, per_cluster: int) -> torch.Tensor:
    """Sorted ids of the `per_cluster` members nearest each centroid (all members of a smaller cluster)."""
    d = (x.double() - centroids[labels]).norm(dim=1)
    out = []
    for c in range(len(centroids)):
        members = torch.nonzero(labels == c).flatten()
        order = torch.sort(d[members], stable=True).indices[:per_cluster]
        out.append(members[order])
    return torch.sort(torch.cat(out)).values


def cluster_scores(rep_scores: torch.Tensor, rep_labels: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Members' scores [N, ...]: the mean over each cluster's representatives (rep_scores [R, ...]),
    given to every member of the cluster."""
    s = rep_scores.double()
    sums = torch.zeros((k,) + tuple(s.shape[1:]), dtype=torch.float64).index_add_(0, rep_labels, s)
    counts = torch.bincount(rep_labels, minlength=k).clamp(min=1).double()
    return (sums / counts.view(-1, *([1] * (s.dim() - 1))))[labels]


class ClusterLessSelector(LessSelector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"clusters": "[1, inf)", "representatives": "[1, inf)", "kmeans_iters": "[1, inf)",
                "embed_batch_size": "[1, inf)", "keep_fraction": "(0, 1]"}
    def __init__(self, clusters: int = 64, representatives: int = 4, kmeans_iters: int = 50, embedder: str = "minilm",
                 tokenizer: Optional[str] = None, cache_dir: Optional[str] = None, embed_batch_size: int = 64,
                 device: str = "auto", keep_fraction: float = 0.1, **kw):
        super().__init__(keep_fraction=keep_fraction, **kw)
        if clusters < 1 or representatives < 1:
            raise ValueError(f"selector.clusters and selector.representatives must be >= 1, got {clusters}, "
                             f"{representatives}")
        embedder_path(embedder)                                       # fails early on a bad path
        self.clusters, self.per_cluster, self.kmeans_iters = clusters, representatives, kmeans_iters
        self.embedder, self.tokenizer, self.cache_dir = embedder, tokenizer, cache_dir
        self.embed_batch_size, self.device = embed_batch_size, device
        self.labels: Optional[torch.Tensor] = None       # [N] cluster of every pool sample
        self.reps: Optional[torch.Tensor] = None         # [R] representative sample ids

    def _start(self, state: DataState) -> None:
        super()._start(state)
        if self.phase == "warmup" and self.labels is None:          # not when training on a selection file
            self.cluster(state)

    def cluster(self, state: DataState) -> None:
        flex = state.signals.flex
        tok = run_tokenizer(state, self.tokenizer)
        ids = torch.arange(len(flex.data))
        check_vocab(flex.data, ids, tok)
        emb = cached_embeddings(load_embedder(self.embedder, self.device), sample_texts(flex.data, ids, tok),
                                self.cache_dir, self.embed_batch_size, self.progress and dist.rank() == 0,
                                "embedding the pool")
        centroids, labels = kmeans(torch.nn.functional.normalize(emb.double(), dim=-1), self.clusters,
                                   self.kmeans_iters, self.seed)
        reps = representatives(torch.nn.functional.normalize(emb.double(), dim=-1), centroids, labels,
                               self.per_cluster)
        self.labels, self.reps = dist.broadcast_object((labels, reps))            # one clustering for all ranks

    def checkpoint_cosines(self, state: DataState, i: int, step: int, lr: float,
                           pool_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, J]: the representatives' LESS cosines (LessSelector.checkpoint_cosines on their ids),
        averaged per cluster and given to every member."""
        if pool_ids is not None:
            return super().checkpoint_cosines(state, i, step, lr, pool_ids)
        rep_cos = super().checkpoint_cosines(state, i, step, lr, self.reps)
        return cluster_scores(rep_cos, self.labels[self.reps], self.labels, int(self.labels.max()) + 1)

    def exports(self, state: DataState) -> dict:
        out = super().exports(state).get("less_selection.json")
        if out is None:
            return {}
        if self.labels is not None:
            out.update({"clusters": int(self.labels.max()) + 1, "representatives": self.reps.tolist(),
                        "cluster_of_kept": self.labels[self.kept_ids].tolist(),
                        "embedder": str(embedder_path(self.embedder))})
        return {"cluster_less_selection.json": out}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "labels": self.labels, "reps": self.reps}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.labels, self.reps = sd["labels"], sd["reps"]
