"""Exact per-sample gradients with torch.func (vmap over grad), chunked, optionally projected."""
from __future__ import annotations

import torch
from torch.func import functional_call, grad, vmap

from dataflex.core.loss import per_sample_loss
from dataflex.grad.params import PerSampleGrads, sample_rows, select_params
from dataflex.grad.projection import SparseProjector
from dataflex.models.forward import SAMPLE_KEYS


def vmap_grads(module, batch, params, projector, chunk_size, forward, train_mode) -> PerSampleGrads:
    batch = sample_rows(batch)          # a packed batch: each sample on its own row (exact, see sample_rows)
    chosen = select_params(module, params)
    trainable = {n: p.detach() for n, p in chosen.items()}
    fixed = {n: p.detach() for n, p in module.named_parameters() if n not in trainable}
    fixed.update(dict(module.named_buffers()))

    def one_sample_loss(tp, sample):
        one = {k: v.unsqueeze(0) for k, v in sample.items()}
        logits = forward(lambda *a, **kw: functional_call(module, {**tp, **fixed}, a, kw), one)
        return per_sample_loss(logits, one["labels"], one["loss_mask"])[0]

    grad_fn = vmap(grad(one_sample_loss), in_dims=(None, 0), randomness="different" if train_mode else "error")
    n = batch["input_ids"].shape[0]
    sparse = isinstance(projector, SparseProjector)
    norms, grads, projected = [], {name: [] for name in trainable}, []
    for start in range(0, n, chunk_size):
        sample = {k: batch[k][start:start + chunk_size] for k in SAMPLE_KEYS}
        g = grad_fn(trainable, sample)
        norms.append(torch.sqrt(sum(t.flatten(1).float().pow(2).sum(1) for t in g.values())))
        if sparse:                       # project the chunk now: memory stays at one chunk's gradients
            projected.append(projector.project(torch.cat([t.flatten(1) for t in g.values()], 1)))
            continue
        for name, t in g.items():
            grads[name].append(t)
    if sparse:
        return PerSampleGrads(torch.cat(norms), projected=torch.cat(projected), projector=projector.describe())
    result = PerSampleGrads(torch.cat(norms), grads={k: torch.cat(v) for k, v in grads.items()})
    if projector is None:
        return result
    # one projection of the whole batch: generating R costs far more than holding B x P gradients
    return PerSampleGrads(result.norms, projected=projector.project(result.flat()), projector=projector.describe())
