"""Static mixture: fixed domain weights for the whole run (the baseline every mixer is compared to).

weights: "uniform" (1/K each), "size" (proportional to each domain's sample count, i.e. the data
eaten whole), {domain: weight} / a list in domain order, or the path of a JSON/YAML mixture file
({domain: weight}, or {"weights": {domain: weight}, ...} as `launch/regmix.py` and DoReMi write it).

temperature tau: w_i ∝ base_i ** tau, then renormalised. With weights="size" this is the
temperature-scaled size prior of multilingual sampling, RegMix (tau = 0.5 for its Dirichlet prior)
and UniMax: tau = 1 keeps the sizes, tau -> 0 tends to uniform, tau > 1 sharpens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch

from dataflex.core.plugin import Mixer
from dataflex.core.state import DataState

WeightSpec = Union[str, Mapping[str, float], Sequence[float]]

NAMED = ("uniform", "size")


def load_mixture_file(path) -> dict:
    """{domain: weight} from a JSON or YAML file (a top-level `weights` key is followed)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"mixer weights file not found: {path}")
    text = p.read_text()
    if p.suffix == ".json":
        data = json.loads(text)
    else:
        import yaml
        data = yaml.safe_load(text)
    if isinstance(data, Mapping) and "weights" in data:
        data = data["weights"]
    if not isinstance(data, Mapping) or not all(isinstance(v, (int, float)) for v in data.values()):
        raise ValueError(f"{path}: a mixture file holds {{domain: weight}} (or {{weights: {{...}}}}), got {data!r}")
    return dict(data)


def temperature_weights(base: torch.Tensor, temperature: float) -> torch.Tensor:
    """w_i ∝ base_i ** temperature (0 stays 0), normalised."""
    if temperature <= 0:
        raise ValueError(f"mixer temperature must be > 0, got {temperature}")
    base = torch.as_tensor(base, dtype=torch.float64)
    w = torch.where(base > 0, base.clamp(min=1e-300) ** temperature, torch.zeros_like(base))
    return w / w.sum()


def resolve_weights(spec: WeightSpec, domains: Sequence[str], sizes: Sequence[int],
                    temperature: float = 1.0) -> torch.Tensor:
    K = len(domains)
    if isinstance(spec, (str, Path)) and str(spec) not in NAMED:
        if not (Path(spec).suffix in (".json", ".yaml", ".yml") or Path(spec).exists()):
            raise ValueError(f"mixer weights must be 'uniform', 'size', per-domain numbers or a mixture file "
                             f"path, got {spec!r}")
        spec = load_mixture_file(spec)
    if isinstance(spec, str):
        if spec == "uniform":
            w = torch.ones(K, dtype=torch.float64)
        else:
            w = torch.tensor(list(sizes), dtype=torch.float64)
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
    w = w / w.sum()
    return w if temperature == 1.0 else temperature_weights(w, temperature)


class StaticMixer(Mixer):
    SETTINGS = {"temperature": "(0, inf)"}   # checked before any data is read (dataflex.core.settings)
    def __init__(self, weights: WeightSpec = "uniform", temperature: float = 1.0):
        self.spec, self.temperature = weights, temperature
        self._weights = None

    def setup(self, state: DataState) -> None:
        self._weights = resolve_weights(self.spec, state.domains, self.domain_sizes(state).tolist(), self.temperature)

    def weights(self, state: DataState) -> torch.Tensor:
        return self._weights
