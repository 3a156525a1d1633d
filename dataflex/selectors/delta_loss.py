"""Delta-loss selection: keep the candidates whose loss has dropped most since first seen.

Each sample's first probed loss is remembered (a sparse table: only samples ever drawn); a
candidate's score is first_loss - current_loss, so samples the model is learning fastest are kept
(`prefer=drop`), or the ones it is learning least (`prefer=stuck`: smallest drop, including those
whose loss rose). A sample seen for the first time scores 0. This follows OpenDCAI/DataFlex's
`delta_loss` selector's signal (current loss against the initial one); the direction is a choice
left to the user.
"""
from __future__ import annotations

import torch

from dataflex.core.plugin import Selector
from dataflex.core.state import DataState
from dataflex.selectors.loss import select_top_loss


def delta_scores(first: torch.Tensor, current: torch.Tensor, prefer: str = "drop") -> torch.Tensor:
    drop = first.double() - current.double()
    return drop if prefer == "drop" else -drop


class DeltaLossSelector(Selector):
    def __init__(self, keep_fraction: float = 0.5, prefer: str = "drop"):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        if prefer not in ("drop", "stuck"):
            raise ValueError(f"selector.prefer must be 'drop' or 'stuck', got {prefer!r}")
        self.keep_fraction, self.prefer = keep_fraction, prefer
        self.candidate_factor = 1.0 / keep_fraction
        self.first: dict[int, float] = {}

    def select(self, state: DataState) -> torch.Tensor:
        losses = state.signals.probe(state.candidate_ids)
        state.candidate_losses = losses
        ids = state.candidate_ids.tolist()
        for i, loss in zip(ids, losses.tolist()):
            self.first.setdefault(i, loss)
        first = torch.tensor([self.first[i] for i in ids], dtype=torch.float64)
        scores = delta_scores(first, losses, self.prefer)
        mask = select_top_loss(scores, state.global_batch_size)
        state.metrics.update({"selector/kept_drop_mean": float((first - losses.double())[mask].mean()),
                              "selector/seen_samples": len(self.first)})
        return mask

    def state_dict(self) -> dict:
        ids = torch.tensor(list(self.first), dtype=torch.long)
        return {"ids": ids, "first": torch.tensor(list(self.first.values()), dtype=torch.float64)}

    def load_state_dict(self, sd: dict) -> None:
        self.first = dict(zip(sd["ids"].tolist(), sd["first"].tolist()))
