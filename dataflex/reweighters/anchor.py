"""Anchor reweighting: samples that resemble a trusted anchor set count more (online, in the style
of ADAPT-like embedding-similarity reweighting).

The current model embeds samples (its last hidden state averaged over label tokens, a probe
without gradients). The anchor set, a few samples of the run's `target` data or of one training
domain, is embedded every `refresh_every` steps, so "resembling the anchor" follows the model as
it learns. Each sample of the global batch gets its mean cosine similarity to the anchors,

    sim_i = mean_j cos(e_i, a_j) = <e_i / |e_i|, mean_j a_j / |a_j|>,
    w_i   = B softmax(sim / temperature)_i,

so temperature -> inf is uniform and a small temperature concentrates on the closest samples.
The batch's embeddings cost one forward without gradients a step (reported apart in `bench/`).

Which mean: under the run's default token mean (`trainer.loss_reduction=token`) a sample weight w_i
multiplies each of the sample's n_i label tokens, so sample i's share of the loss is
w_i n_i / sum_j w_j n_j: the weighting is length-weighted (a long sample counts more, as it does
unweighted). The paper's per-sample form, sum_i w_i lbar_i / sum_i w_i over per-sample means, is
`trainer.loss_reduction=sample` (`DataFlex(loss_reduction="sample")`).
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.plugin import Reweighter
from dataflex.core.state import DataState
from dataflex.core.targets import resolve_target
from dataflex.reweighters.common import weight_stats


def anchor_similarity(embeddings: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """[B] mean cosine similarity of each embedding to the anchor embeddings."""
    e = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    a = torch.nn.functional.normalize(anchors.double(), dim=-1).mean(0)
    return e @ a


def anchor_weights(embeddings: torch.Tensor, anchors: torch.Tensor, temperature: float) -> torch.Tensor:
    """Weights summing to 1: softmax of the similarity over the temperature."""
    return torch.softmax(anchor_similarity(embeddings, anchors) / temperature, 0)


class AnchorReweighter(Reweighter):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"anchor_samples": "[1, inf)", "temperature": "(0, inf)", "refresh_every": "[1, inf)",
                "burnout_steps": "[0, inf)"}
    def __init__(self, anchor: str = "target", anchor_samples: int = 64, temperature: float = 0.1,
                 refresh_every: int = 50, burnout_steps: int = 0):
        if temperature <= 0:
            raise ValueError(f"reweighter.temperature must be positive, got {temperature}")
        self.anchor, self.anchor_samples, self.temperature = anchor, anchor_samples, temperature
        self.refresh_every, self.burnout_steps = refresh_every, burnout_steps
        self.anchors: Optional[torch.Tensor] = None
        self.refreshed_at = -1

    def anchor_ids(self, state: DataState):
        """(ids, dataset) of the anchor set, the same on every rank (dataflex.core.targets)."""
        return resolve_target(state, self.anchor, self.anchor_samples)

    def weigh(self, state: DataState) -> torch.Tensor:
        n = state.losses.numel()
        if state.step < self.burnout_steps:
            w = torch.ones(n, dtype=torch.float64)
        else:
            if self.anchors is None or state.step - self.refreshed_at >= self.refresh_every:
                ids, dataset = self.anchor_ids(state)
                self.anchors = state.signals.probe(ids, output="embedding", dataset=dataset)
                self.refreshed_at = state.step
            emb = state.signals.probe(state.batch_ids, output="embedding")
            sim = anchor_similarity(emb, self.anchors)
            w = torch.softmax(sim / self.temperature, 0) * n
            state.metrics["reweighter/anchor_similarity"] = float(sim.mean())
        state.metrics.update(weight_stats(w))
        return w

    def state_dict(self) -> dict:
        return {"anchors": self.anchors, "refreshed_at": self.refreshed_at}

    def load_state_dict(self, state: dict) -> None:
        self.anchors, self.refreshed_at = state["anchors"], state["refreshed_at"]
