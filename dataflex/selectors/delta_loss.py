"""Delta-loss selection: keep the candidates whose loss has dropped most since the start of training.

Baseline (`baseline=pool`, the default): the loss of every sample of the pool under the INITIAL model,
measured in one probe pass over the whole pool at the first selection (before the first optimizer
step), cached, and saved in `state_dict` (a resumed run does not probe again). A candidate's score is
baseline_loss - current_loss: the samples the model has learned most are kept (`prefer=drop`), or the
ones it has learned least (`prefer=stuck`: smallest drop, including those whose loss rose). This is the
signal of OpenDCAI/DataFlex's `delta_loss` selector (the current loss against the initial one); the
direction is a choice left to the user. The probe pass costs one forward per pool sample
(`DataFlex(probe_batch_size=...)` samples a forward, split over ranks).

`baseline=first_probe` is a cheaper, different signal, named for what it is: a sample's baseline is its
loss when it is first probed as a candidate (remembered only for the samples ever drawn). During the
first pass over the pool every candidate is new and scores 0, so the first k in draw order are kept;
later the baselines come from models of different ages.
"""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.plugin import Selector
from dataflex.core.state import DataState
from dataflex.selectors.loss import select_top_loss

BASELINES = ("pool", "first_probe")


def delta_scores(baseline: torch.Tensor, current: torch.Tensor, prefer: str = "drop") -> torch.Tensor:
    """baseline - current (`drop`) or its negation (`stuck`), float64."""
    drop = baseline.double() - current.double()
    return drop if prefer == "drop" else -drop


class DeltaLossSelector(Selector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"keep_fraction": "(0, 1]", "prefer": ('drop', 'stuck'), "baseline": ('pool', 'first_probe')}
    def __init__(self, keep_fraction: float = 0.5, prefer: str = "drop", baseline: str = "pool"):
        if not 0 < keep_fraction <= 1:
            raise ValueError(f"selector.keep_fraction must be in (0, 1], got {keep_fraction}")
        if prefer not in ("drop", "stuck"):
            raise ValueError(f"selector.prefer must be 'drop' or 'stuck', got {prefer!r}")
        if baseline not in BASELINES:
            raise ValueError(f"selector.baseline must be one of {BASELINES}, got {baseline!r}")
        self.keep_fraction, self.prefer, self.baseline = keep_fraction, prefer, baseline
        self.candidate_factor = 1.0 / keep_fraction
        self.initial: Optional[torch.Tensor] = None      # [N] pool losses under the initial model
        self.first: dict[int, float] = {}                  # first_probe: {sample id: first probed loss}

    def baseline_losses(self, state: DataState, ids: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        if self.baseline == "pool":
            if self.initial is None:                       # the first selection: the model is the initial one
                self.initial = state.signals.probe(torch.arange(sum(state.domain_sizes))).double().cpu()
            return self.initial[ids]
        for i, loss in zip(ids.tolist(), losses.tolist()):
            self.first.setdefault(i, loss)
        return torch.tensor([self.first[i] for i in ids.tolist()], dtype=torch.float64)

    def select(self, state: DataState) -> torch.Tensor:
        losses = state.signals.probe(state.candidate_ids)
        state.candidate_losses = losses
        base = self.baseline_losses(state, state.candidate_ids, losses)
        scores = delta_scores(base, losses, self.prefer)
        mask = select_top_loss(scores, state.global_batch_size)
        state.metrics["selector/kept_drop_mean"] = float((base - losses.double())[mask].mean())
        if self.baseline == "first_probe":
            state.metrics["selector/seen_samples"] = len(self.first)
        return mask

    def state_dict(self) -> dict:
        return {"baseline": self.baseline, "initial": self.initial,
                "ids": torch.tensor(list(self.first), dtype=torch.long),
                "first": torch.tensor(list(self.first.values()), dtype=torch.float64)}

    def load_state_dict(self, sd: dict) -> None:
        if sd.get("baseline", "first_probe") != self.baseline:
            raise ValueError(f"delta_loss: the checkpoint's baseline is {sd.get('baseline', 'first_probe')!r}, "
                             f"this selector's {self.baseline!r}")
        self.initial = sd.get("initial")
        self.first = dict(zip(sd["ids"].tolist(), sd["first"].tolist()))
