"""Static mixture: fixed domain weights for the whole run (the baseline every mixer is compared to).

weights: "uniform" (1/K each), "size" (proportional to each domain's sample count, i.e. the data
eaten whole), or {domain: weight} / a list in domain order, renormalised.
"""
from __future__ import annotations

from typing import Mapping, Sequence, Union

import torch

from ..plugin import Mixer
from ..state import DataState

WeightSpec = Union[str, Mapping[str, float], Sequence[float]]


def resolve_weights(spec: WeightSpec, domains: Sequence[str], sizes: Sequence[int]) -> torch.Tensor:
    K = len(domains)
    if isinstance(spec, str):
        if spec == "uniform":
            w = torch.ones(K, dtype=torch.float64)
        elif spec == "size":
            w = torch.tensor(list(sizes), dtype=torch.float64)
        else:
            raise ValueError(f"mixer weights must be 'uniform', 'size' or per-domain numbers, got {spec!r}")
    elif isinstance(spec, Mapping):
        unknown = sorted(set(spec) - set(domains))
        if unknown:
            raise ValueError(f"mixer weights name unknown domain(s) {unknown}; domains are {list(domains)}")
        w = torch.tensor([float(spec.get(d, 0.0)) for d in domains], dtype=torch.float64)
    else:
        w = torch.tensor([float(x) for x in spec], dtype=torch.float64)
        if w.numel() != K:
            raise ValueError(f"mixer weights list has {w.numel()} entries for {K} domains {list(domains)}")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"mixer weights must be non-negative with a positive sum, got {w.tolist()}")
    return w / w.sum()


class StaticMixer(Mixer):
    def __init__(self, weights: WeightSpec = "uniform"):
        self.spec = weights
        self._weights = None

    def setup(self, state: DataState) -> None:
        self._weights = resolve_weights(self.spec, state.domains, state.domain_sizes)

    def weights(self, state: DataState) -> torch.Tensor:
        return self._weights
