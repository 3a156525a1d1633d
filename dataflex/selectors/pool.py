"""The frame of a selector that chooses once from the whole pool (bm25, length_matched): at the first step it
calls `choose(state) -> (keep [N] bool, scores [N] float64)`, keeps the choice through the sampler's pool masks
(with no mixer, domains are drawn in proportion to what each kept), and from then on passes every candidate
through. Every rank takes rank 0's decision; the choice is saved with the checkpoint and exported as
`export_name` in the run folder ({"sample_ids", "scores", "kept_per_domain", ...}), which `length_matched`
reads back."""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.events import Event
from dataflex.core.plugin import Selector
from dataflex.core.state import DataState, keep_pool
from dataflex.utils import dist


def sample_lengths(dataset, ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """[n] long: each sample's real tokens (its loss mask's sum)."""
    out = [torch.as_tensor(dataset.rows(ids[s:s + chunk])[2]).bool().sum(1) for s in range(0, len(ids), chunk)]
    return torch.cat(out).long() if out else torch.zeros(0, dtype=torch.long)


class PoolChoice:
    """A selector's choice of pool samples made once (`phase`, `kept_ids`, `scores`, `pool_counts`): saved with
    the checkpoint and exported as `export_name` with `describe()`'s settings. Shared by the pool selectors here
    and the embedding selectors."""
    export_name = "selection.json"

    def init_choice(self) -> None:
        self.phase = "init"
        self.kept_ids: Optional[torch.Tensor] = None
        self.scores: Optional[torch.Tensor] = None
        self.pool_counts: Optional[list] = None

    def decide(self, state: DataState) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [N] bool, scores [N] float64) over the pool, made once at the first step."""
        raise NotImplementedError

    def apply_keep(self, state: DataState, keep: torch.Tensor) -> None:
        self.pool_counts = keep_pool(state, keep)

    def apply(self, event, state: DataState) -> None:
        if event == Event.AFTER_CANDIDATES:      # pass-through: the pool masks did the selecting
            state.keep_mask = torch.ones(len(state.candidate_ids), dtype=torch.bool)
            return
        if self.phase == "init":
            keep, scores = self.decide(state)
            keep = dist.broadcast_object(keep.clone())         # one decision for every rank
            self.scores = dist.broadcast_object(scores.double().clone())
            self.kept_ids = torch.nonzero(keep).flatten()
            self.apply_keep(state, keep)
            self.phase = "selected"
        state.metrics["selector/phase"] = self.phase
        for name, n in zip(state.domains, self.pool_counts or []):
            state.metrics[f"selector/kept/{name}"] = n

    def describe(self) -> dict:
        """What the export records besides the choice (the settings)."""
        return {}

    def exports(self, state: DataState) -> dict:
        if self.kept_ids is None:
            return {}
        return {self.export_name: {"sample_ids": self.kept_ids.tolist(), "scores": self.scores[self.kept_ids].tolist(),
                                   "kept_per_domain": dict(zip(state.domains, self.pool_counts)),
                                   **self.describe()}}

    def state_dict(self) -> dict:
        return {"phase": self.phase, "kept_ids": self.kept_ids, "scores": self.scores,
                "pool_counts": None if self.pool_counts is None else list(self.pool_counts)}

    def load_state_dict(self, sd: dict) -> None:
        self.phase, self.kept_ids, self.scores = sd["phase"], sd["kept_ids"], sd["scores"]
        self.pool_counts = None if sd["pool_counts"] is None else list(sd["pool_counts"])


class PoolSelector(PoolChoice, Selector):
    events = (Event.BEFORE_SAMPLE, Event.AFTER_CANDIDATES)

    def __init__(self):
        self.init_choice()

    def choose(self, state: DataState) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decide(self, state: DataState) -> tuple[torch.Tensor, torch.Tensor]:
        return self.choose(state)

