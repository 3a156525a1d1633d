"""The one dispatcher of per-sample gradients: exact (torch.func vmap), hooked and projected, or factored."""
from __future__ import annotations

from typing import Callable

import torch

from dataflex.grad.factored import factored_grads
from dataflex.grad.chunking import assemble, batch_samples, chunks
from dataflex.grad.ghost import capture
from dataflex.grad.params import ParamSpec, PerSampleGrads, eval_mode, select_params
from dataflex.grad.projection import SparseProjector
from dataflex.grad.vmap import vmap_grads
from dataflex.models.forward import default_forward


def per_sample_grads(module: torch.nn.Module, batch: dict, params: ParamSpec = "all",
                     projector=None, chunk_size: int = 16, forward: Callable = default_forward,
                     train_mode: bool = False) -> PerSampleGrads:
    """Per-sample gradients of the chosen parameters: exact (`grads`), or `projected` by a
    RademacherProjector, SparseProjector or FactoredProjector; `norms` are always exact. One entry per
    sample, also on a packed batch (several samples a row: per segment, see dataflex.grad.ghost and
    `params.sample_rows`)."""
    if getattr(projector, "factored", False):
        return factored_grads(module, batch, params, projector, chunk_size, forward, train_mode)
    if isinstance(projector, SparseProjector) and projector.engine == "hooks":
        return hook_projected_grads(module, batch, params, projector, chunk_size, forward, train_mode)
    with eval_mode(module, not train_mode):
        return vmap_grads(module, batch, params, projector, chunk_size, forward, train_mode)


def hook_projected_grads(module, batch, params, projector, chunk_size=16, forward=default_forward,
                         train_mode=False, call=None, lean: bool = False) -> PerSampleGrads:
    """Exact per-sample gradients from the hook engine (dataflex.grad.ghost), materialised one parameter
    at a time ([b, numel], Book-Keeping style: one forward and one activation backward, then a
    batched outer product per layer) and projected at that parameter's offset, then dropped.
    `projector=None`: the exact gradients themselves (name -> [B, *shape])."""
    norms, projected, grads, index = [], [], {}, []
    dtypes = {n: p.dtype for n, p in select_params(module, params).items()}
    for part, samples in chunks(batch, chunk_size):
        index.append(samples)
        run = capture(module, part, params, forward, train_mode, call, lean)
        sq, out, offset = 0, 0, 0
        for name, shape in run.shapes.items():
            g = run.materialise(name)
            sq = sq + g.pow(2).sum(1)
            if projector is None:
                grads.setdefault(name, []).append(g.view(-1, *shape).to(dtypes[name]))
            else:
                out = out + projector.project(g, offset)
            offset += g.shape[1]
            del g
        norms.append(sq.sqrt())
        projected.append(out)
    n = batch_samples(batch)
    if projector is None:
        return PerSampleGrads(assemble(norms, index, n), grads={k: assemble(v, index, n) for k, v in grads.items()})
    return PerSampleGrads(assemble(norms, index, n), projected=assemble(projected, index, n),
                          projector=projector.describe())
