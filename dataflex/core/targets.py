"""Where plugins find a target set: the samples a selector or reweighter aims at.

`resolve_target(state, spec, limit)` returns (ids, dataset) for:
  "target"       the data config's `target` (all its samples),
  "DOMAIN"       that domain's validation samples, or its training samples when the run has no
                 validation set,
  "val" / other  any dataset the run was given by name (`DataFlex(datasets=...)`).
At most `limit` samples, evenly spaced, so every rank takes the same ones.
"""
from __future__ import annotations

from typing import Optional

import torch


def evenly_spaced(ids: torch.Tensor, limit: Optional[int]) -> torch.Tensor:
    if limit is None or len(ids) <= limit:
        return ids
    return ids[torch.linspace(0, len(ids) - 1, limit).round().long().unique()]


def resolve_target(state, spec: str, limit: Optional[int] = None):
    signals = state.signals
    val = signals.dataset("val")
    if spec in state.domains:
        d = state.domains.index(spec)
        if val is not None and spec in val.names:
            vd = val.names.index(spec)
            ids = torch.nonzero(torch.as_tensor(val.domain[torch.arange(len(val))]) == vd).flatten()
            return evenly_spaced(ids, limit), val
        start = sum(state.domain_sizes[:d])
        return evenly_spaced(torch.arange(start, start + state.domain_sizes[d]), limit), None
    dataset = signals.dataset(spec)
    if dataset is None:
        known = sorted(signals.flex.datasets) if hasattr(signals, "flex") else []
        raise ValueError(f"target {spec!r} is neither a domain ({', '.join(state.domains)}) nor a dataset of the run "
                         f"({', '.join(known) or 'none'}; `target` needs `target: {{val: PATH}}` in the data config)")
    return evenly_spaced(torch.arange(len(dataset)), limit), dataset
