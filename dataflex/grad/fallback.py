"""Exact per-sample gradients where torch.func cannot go: a loop of one-sample backwards.

torch.func's vmap(grad) is the fast path (`dataflex.grad.params`). It cannot run recurrent layers (GRU,
LSTM), BatchNorm in train mode, gradient checkpointing in train mode, custom autograd Functions
without a vmap rule (Bloom's), or models that branch on tensor values. `guarded_per_sample_grads`
detects the known cases up front, catches functorch's own errors for the rest, and then runs
`loop_per_sample_grads`, exact by construction (one forward and backward per sample), with a
one-line warning naming the module; any other error propagates unchanged.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
from torch import nn

from dataflex.core.loss import per_sample_loss
from dataflex.grad.params import ParamSpec, PerSampleGrads, eval_mode, sample_rows, select_params
from dataflex.grad.vmap import vmap_grads
from dataflex.models.forward import SAMPLE_KEYS, default_forward

FUNCTORCH_ERRORS = ("vmap", "functorch", "torch.func", "autograd.Function", "data-dependent", "setup_context",
                    "Batching rule not implemented", "batched tensor", "BatchedTensor")


def vmap_obstacle(module: nn.Module, train_mode: bool) -> Optional[str]:
    """'name (Type)' of the first submodule torch.func cannot differentiate per sample, or None."""
    for name, m in module.named_modules():
        label = f"{name or type(module).__name__} ({type(m).__name__})"
        if isinstance(m, nn.RNNBase):
            return label + ": a recurrent layer"
        if train_mode and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return label + ": BatchNorm in train mode"
        if train_mode and m.training and getattr(m, "gradient_checkpointing", False) is True:
            return label + ": gradient checkpointing"
    return None


def is_functorch_error(e: BaseException) -> bool:
    text = str(e)
    return isinstance(e, (RuntimeError, NotImplementedError, TypeError)) and any(k in text for k in FUNCTORCH_ERRORS)


_warned: set = set()


def _warn(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        warnings.warn(f"per-sample gradients: torch.func cannot run {what}; using an exact per-sample loop "
                      "(one backward per sample)", stacklevel=3)


def guarded_per_sample_grads(module: nn.Module, batch: dict, params: ParamSpec = "all", projector=None,
                             chunk_size: int = 16, forward: Optional[Callable] = None, train_mode: bool = False,
                             fast: Optional[Callable] = None) -> PerSampleGrads:
    """`fast` (dataflex.grad.api.per_sample_grads, which dispatches on the projector; default: torch.func's
    vmap, which takes no factored or hooked projector) where it can run, else the exact loop."""
    fast = fast or _vmap_in_eval_mode

    forward = forward or default_forward
    obstacle = vmap_obstacle(module, train_mode)
    if obstacle is None:
        try:
            return fast(module, batch, params, projector, chunk_size, forward, train_mode)
        except Exception as e:  # noqa: BLE001 - only functorch's own errors are taken over
            if not is_functorch_error(e):
                raise
            first = str(e).strip().splitlines()[0][:160]
            obstacle = f"{type(module).__name__} ({type(e).__name__}: {first})"
    _warn(obstacle)
    return loop_per_sample_grads(module, batch, params, projector, forward, train_mode)


def _vmap_in_eval_mode(module, batch, params, projector, chunk_size, forward, train_mode) -> PerSampleGrads:
    with eval_mode(module, not train_mode):
        return vmap_grads(module, batch, params, projector, chunk_size, forward, train_mode)


def loop_per_sample_grads(module: nn.Module, batch: dict, params: ParamSpec = "all", projector=None,
                          forward: Optional[Callable] = None, train_mode: bool = False) -> PerSampleGrads:
    """Exact per-sample gradients, one forward and backward per sample; frozen parameters that were
    chosen are differentiated too (requires_grad is set for the call and restored)."""

    forward = forward or default_forward
    batch = sample_rows(batch)          # a packed batch: each sample on its own row (exact, see sample_rows)
    chosen = select_params(module, params)
    flags = {n: p.requires_grad for n, p in chosen.items()}
    keys = [k for k in (*SAMPLE_KEYS, "attention_mask") if k in batch]
    n = batch["input_ids"].shape[0]
    grads = {name: [] for name in chosen}
    try:
        for p in chosen.values():
            p.requires_grad_(True)
        with eval_mode(module, not train_mode), torch.enable_grad():
            for i in range(n):
                one = {k: batch[k][i:i + 1] for k in keys}
                loss = per_sample_loss(forward(module, one), one["labels"], one["loss_mask"])[0]
                got = torch.autograd.grad(loss, list(chosen.values()), allow_unused=True)
                for (name, p), g in zip(chosen.items(), got):
                    grads[name].append(torch.zeros_like(p) if g is None else g.detach())
    finally:
        for name, p in chosen.items():
            p.requires_grad_(flags[name])
    stacked = {name: torch.stack(v) for name, v in grads.items()}
    norms = torch.sqrt(sum(t.flatten(1).float().pow(2).sum(1) for t in stacked.values()))
    result = PerSampleGrads(norms, grads=stacked)
    if projector is None:
        return result
    return PerSampleGrads(norms, projected=projector.project(result.flat()), projector=projector.describe())
