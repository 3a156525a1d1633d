"""Exact per-sample gradients with torch.func (vmap over grad of a one-sample loss).

Parameters are chosen by name: "all", "lora" (LoRA adapters), a regular expression, or a list of
them. vmap runs over chunks of samples, bounding its activation memory; with a projector, the B x P
gradients are projected in one pass (the random matrix is the expensive part) and dropped. Norms
are exact: the L2 norm of each sample's full gradient over the chosen parameters.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch.func import functional_call, grad, vmap

from .loss import per_sample_loss
from .projection import RademacherProjector

ParamSpec = Union[str, Sequence[str]]
SAMPLE_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def default_forward(call: Callable, batch: dict) -> torch.Tensor:
    """Run a causal LM on a batch and return logits (HF-style outputs with `.logits` work too)."""
    out = call(batch["input_ids"], position_ids=batch["position_ids"])
    return getattr(out, "logits", out)


def select_params(module: torch.nn.Module, params: ParamSpec = "all") -> dict:
    patterns = [params] if isinstance(params, str) else list(params)
    named = dict(module.named_parameters())
    if patterns == ["all"]:
        chosen = named
    else:
        regexes = [re.compile(r"lora_" if p == "lora" else p) for p in patterns]
        chosen = {n: p for n, p in named.items() if any(r.search(n) for r in regexes)}
    if not chosen:
        raise ValueError(f"no parameter matches {patterns!r}; parameters look like: {list(named)[:6]}")
    return chosen


@dataclass
class PerSampleGrads:
    norms: torch.Tensor                              # [B]
    grads: Optional[dict] = None                     # name -> [B, *param.shape], unless projected
    projected: Optional[torch.Tensor] = None         # [B, d]
    projector: Optional[dict] = None                 # RademacherProjector.describe()

    def flat(self) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in self.grads.values()], dim=1)

    def save(self, path, sample_ids: torch.Tensor, **meta) -> None:
        """Store projected features with the projector and seed that made them: features from
        different projectors or seeds live in different spaces and must never be compared."""
        if self.projected is None:
            raise ValueError("only projected gradients are stored; pass a RademacherProjector")
        torch.save({"features": self.projected, "norms": self.norms, "sample_ids": torch.as_tensor(sample_ids),
                    "projector": self.projector, **meta}, path)

    @staticmethod
    def load(path) -> dict:
        return torch.load(path, weights_only=False)


def per_sample_grads(module: torch.nn.Module, batch: dict, params: ParamSpec = "all",
                     projector: Optional[RademacherProjector] = None, chunk_size: int = 16,
                     forward: Callable = default_forward) -> PerSampleGrads:
    chosen = select_params(module, params)
    trainable = {n: p.detach() for n, p in chosen.items()}
    fixed = {n: p.detach() for n, p in module.named_parameters() if n not in trainable}
    fixed.update(dict(module.named_buffers()))

    def one_sample_loss(tp, sample):
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        logits = forward(lambda *a, **kw: functional_call(module, {**tp, **fixed}, a, kw), one)
        return per_sample_loss(logits, one["labels"], one["loss_mask"])[0]

    grad_fn = vmap(grad(one_sample_loss), in_dims=(None, 0))
    n = batch["input_ids"].shape[0]
    norms, grads = [], {name: [] for name in trainable}
    for start in range(0, n, chunk_size):
        sample = {k: batch[k][start:start + chunk_size] for k in SAMPLE_KEYS}
        g = grad_fn(trainable, sample)
        norms.append(torch.sqrt(sum(t.flatten(1).float().pow(2).sum(1) for t in g.values())))
        for name, t in g.items():
            grads[name].append(t)
    result = PerSampleGrads(torch.cat(norms), grads={k: torch.cat(v) for k, v in grads.items()})
    if projector is None:
        return result
    # one projection of the whole batch: generating R costs far more than holding B x P gradients
    return PerSampleGrads(result.norms, projected=projector.project(result.flat()), projector=projector.describe())
