"""Ghost signals: exact per-sample gradient norms and inner products without per-sample gradients.

One forward with hooks and one backward of L = sum_i L_i (L_i the sample's mean loss over its
label tokens) give, for every hooked layer, its inputs a_it and the gradients b_it = dL_i/dy_it of
its outputs (samples do not mix in a causal LM, so dL/dy_it = dL_i/dy_it). The backward runs
`torch.autograd.grad` towards those outputs only: no weight gradient is ever formed.

Every chosen parameter's per-sample gradient is then a sum of contributions:

    Linear weight [out, in]   G_i = sum_t b_t a_t^T          factor (rows b_t, cols a_t)
    Embedding weight [V, d]   G_i = sum_t e_{x_t} b_t^T      factor (rows one-hot x_t, cols b_t)
    Linear bias               g_i = sum_t b_t                dense [B, out]
    LayerNorm / RMSNorm       w: sum_t b_t * xhat_t, b: sum_t b_t   dense (xhat the normalised input;
                              transformers' Llama-family RMSNorms too)
    anything else             torch.func vmap over those parameters only (exact, costs a per-sample
                              forward and backward: rare, reported in `EngineRun.fallback`)

A parameter used by several modules (tied weights, a module called twice) sums their contributions.
A hooked parameter also used outside its modules (a tied head written `F.linear(h, emb.weight)`,
`emb.weight[ids]`) is found in the autograd graph and sent to the exact path (`dataflex.grad.outside`).

The algebra of those factors (ghost norms, inner products with a target gradient, the lean head's factor
recomputed a vocabulary chunk at a time) is `dataflex.grad.factors`; this module captures them (hooks, one
forward and one backward), routes what it cannot factor to the exact path and dispatches by chunk.

Packed batches (`segment_ids`: several samples a row, `dataflex.core.packing`): a sample is a segment, so
L = sum_j L_j runs over segments, and every sum over t above runs over that segment's own token slots.
Attention never crosses segments, so b_t = dL_j/dy_t for the segment j holding t, and the forward and
backward run on the packed rows as trained. Norms take the same T x T form per row, masked to same-segment
pairs; dots and dense contributions are per-token terms summed per segment; materialising (and the
factored projection) lays each segment's tokens out as its own row. Results have one entry per sample
(`sample_id` order), as for a padded batch; a sample with no token slot has a zero gradient.

Randomness: by default the module runs in eval mode (dropout off), so every path and every
chunking of the batch gives the same numbers. `train_mode=True` keeps the module's mode: the
gradients are those of the batched forward's own dropout masks (exact for that forward).
Tensors stay on the module's device; bf16 activations are accumulated in float32.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from dataflex.core.lean_loss import IGNORE_INDEX, LeanOutput, chunked_logsumexp, head_params
from dataflex.core.loss import per_sample_loss, per_token_loss
from dataflex.core.packing import Segments
from dataflex.grad.chunking import assemble, batch_samples, chunks
from dataflex.grad.factors import Factor, HeadFactor, ghost_inner, token_sum
from dataflex.grad.fallback import guarded_per_sample_grads
from dataflex.grad.outside import outside_uses, warn_outside
from dataflex.grad.params import ParamSpec, eval_mode, select_params
from dataflex.models.forward import default_forward
from dataflex.models.lean import lean_forward

NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# transformers' RMSNorms of the Llama family: weight * (x / rms(x)), computed in float32 and cast back to the
# input's dtype before the weight multiplies it, no bias, eps in `variance_epsilon` (Gemma's 1 + weight is not here)
HF_RMS_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}


def _hf_rms_norm(mod: nn.Module) -> bool:
    cls = type(mod)
    return cls.__name__ in HF_RMS_NORMS and cls.__module__.startswith("transformers.") \
        and hasattr(mod, "variance_epsilon") and set(mod._parameters) == {"weight"}


@dataclass
class EngineRun:
    """One chunk's captured contributions: name -> list of Factor or dense [B, numel] tensors."""
    contributions: dict
    shapes: dict
    batch_size: int
    fallback: list = field(default_factory=list)
    device: torch.device = torch.device("cpu")

    def materialise(self, name: str) -> torch.Tensor:
        """[B, numel] per-sample gradient of one parameter (the reference, and the cheap cases);
        zeros for a parameter the forward never used."""
        parts = [c.materialise().flatten(1) if isinstance(c, Factor) else c for c in self.contributions[name]]
        if not parts:
            return torch.zeros(self.batch_size, torch.Size(self.shapes[name]).numel(), device=self.device)
        return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


def _shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))       # ZeRO-3 partitions keep the full shape here


def _plain(mod: nn.Module, cls) -> bool:
    return isinstance(mod, cls) and type(mod).forward is cls.forward


def hook_plan(module: nn.Module, chosen: dict) -> tuple[list, list]:
    """[(submodule, {"weight"/"bias": name})] for the supported layers owning chosen parameters,
    and the chosen names no supported layer owns (they go through the vmap fallback)."""
    by_id = {id(p): n for n, p in chosen.items()}
    plan, covered = [], set()
    for mod in module.modules():
        roles = {r: by_id[id(p)] for r, p in mod._parameters.items() if p is not None and id(p) in by_id}
        if not roles:
            continue
        ok = (_plain(mod, nn.Linear) or (_plain(mod, nn.Embedding) and mod.max_norm is None)
              or any(_plain(mod, c) for c in NORMS) or _hf_rms_norm(mod))
        if ok and set(roles) <= {"weight", "bias"}:
            plan.append((mod, roles))
            covered.update(roles.values())
    return plan, [n for n in chosen if n not in covered]


def _flat3(t: torch.Tensor, B: int) -> torch.Tensor:
    return t.reshape(B, -1, t.shape[-1]).float()


def _contributions(mod, roles, x, b, B, seg: Optional[Segments] = None) -> list:
    """[(name, Factor | dense)] of one call of a hooked layer: input x, output gradient b; B rows (packed:
    `seg` maps their token slots to samples)."""
    out = []
    if isinstance(mod, nn.Linear):
        b = _flat3(b, B)
        if "weight" in roles:
            out.append((roles["weight"], Factor(b, _flat3(x, B), mod.out_features, seg)))
        if "bias" in roles:
            out.append((roles["bias"], token_sum(b, seg)))
    elif isinstance(mod, nn.Embedding):
        idx = x.reshape(B, -1)
        b = _flat3(b, B)
        if mod.padding_idx is not None:                 # the padding row gets no gradient
            b = b * (idx != mod.padding_idx).unsqueeze(-1).to(b.dtype)
        out.append((roles["weight"], Factor(idx, b, mod.num_embeddings, seg)))
    else:                                               # LayerNorm / RMSNorm: elementwise affine
        shape = _norm_shape(mod)
        width = int(torch.Size(shape).numel())
        xf, bf = x.float(), b.float()
        if isinstance(mod, nn.LayerNorm):
            xhat = F.layer_norm(xf, shape, eps=mod.eps)
        elif _hf_rms_norm(mod):
            xhat = F.rms_norm(xf, shape, eps=mod.variance_epsilon).to(x.dtype).float()
        else:
            eps = mod.eps if mod.eps is not None else torch.finfo(x.dtype).eps
            xhat = F.rms_norm(xf, shape, eps=eps)
        if "weight" in roles:
            out.append((roles["weight"], token_sum((bf * xhat).reshape(B, -1, width), seg)))
        if "bias" in roles:
            out.append((roles["bias"], token_sum(bf.reshape(B, -1, width), seg)))
    return out


def _norm_shape(mod) -> tuple:
    """The elementwise-affine shape of a norm layer (torch's LayerNorm/RMSNorm, or an HF RMSNorm that has
    only its weight: under ZeRO-3 its full shape, not the partition's)."""
    return tuple(mod.normalized_shape) if hasattr(mod, "normalized_shape") else _shape(mod.weight)


def _per_token(mod, x, out, B: int, T: int) -> bool:
    """Whether a hooked call's tensors hold one entry per token slot of the B x T rows, batch first (what
    splitting a packed row into its samples needs)."""
    if isinstance(mod, nn.Embedding):
        return x.numel() == B * T and x.shape[0] == B
    width = mod.out_features if isinstance(mod, nn.Linear) else int(torch.Size(_norm_shape(mod)).numel())
    return out.numel() == B * T * width and out.shape[0] == B


def sample_losses(logits, batch: dict, seg: Optional[Segments] = None) -> torch.Tensor:
    """[samples] mean loss over each sample's label tokens: its row (padded) or its segment (packed)."""
    if seg is None:
        return per_sample_loss(logits, batch["labels"], batch["loss_mask"])
    token = per_token_loss(logits, batch["labels"])
    mask = batch["loss_mask"].to(token.dtype)
    return seg.sum(token * mask) / seg.sum(mask).clamp(min=1.0)


def capture(module: nn.Module, batch: dict, params: ParamSpec = "all", forward: Callable = default_forward,
            train_mode: bool = False, call: Optional[Callable] = None, lean: bool = False) -> EngineRun:
    """One forward and one activation-only backward of the batch; see the module docstring.
    `call` runs the forward (a DeepSpeed engine); hooks go on `module`. `lean=True`: where the model
    offers its last hidden states and head (`dataflex.models.lean.lean_forward`), the loss is the
    chunked one (`core.lean_loss`) and the head's weight gets a `HeadFactor` (no [B, T, V] tensor)."""
    chosen = select_params(module, params)
    plan, leftover = hook_plan(module, chosen)
    B, T = batch["input_ids"].shape
    seg = Segments.of(batch)
    records, handles = [], []
    stage = getattr(call, "zero_optimization_stage", None)
    if callable(stage) and stage() == 3:           # the head's weight is a ZeRO-3 partition: the logits path
        lean = False

    def hook(mod, args, out, roles=None):
        if not out.requires_grad:        # frozen up to here: make the output a leaf to read its gradient
            out = out.detach().requires_grad_()
        records.append((mod, roles, args[0].detach(), out, args[0].grad_fn))
        return out

    for mod, roles in plan:
        handles.append(mod.register_forward_hook(lambda m, a, o, r=roles: hook(m, a, o, r)))
    hooked = {n for _, roles in plan for n in roles.values()}
    frozen = [p for n, p in chosen.items() if n in hooked and not p.requires_grad]
    try:
        for p in frozen:                 # recorded by autograd, so that every use of it can be seen
            p.requires_grad_(True)
        with eval_mode(module, not train_mode), torch.enable_grad():
            out = lean_forward(forward, call or module, batch) if lean and seg is None else None
            head_part = None
            if isinstance(out, LeanOutput):
                out, head_part = _lean_loss(out, batch, chosen)
                records[:] = [r for r in records if r[0] is not head_part[0]]   # HF's one-position head call
            else:
                out = forward(call or module, batch)
            loss = sample_losses(out, batch, seg).sum()
            outside = outside_uses(loss, records, {n: p for n, p in chosen.items() if n in hooked})
            outs = [r[3] for r in records]
            grads = torch.autograd.grad(loss, outs, allow_unused=True) if outs and loss.requires_grad \
                else [None] * len(outs)
    finally:
        for h in handles:
            h.remove()
        for p in frozen:
            p.requires_grad_(False)
    contributions, unsplit = {n: [] for n in chosen}, set()
    for (mod, roles, x, y, _), g in zip(records, grads):
        if seg is not None and not _per_token(mod, x, y, B, T):     # a packed row's call not per token slot
            unsplit.update(roles.values())
            continue
        g = torch.zeros_like(y) if g is None else g.detach()
        for name, c in _contributions(mod, roles, x, g, B, seg):
            contributions[name].append(c)
    if head_part is not None:
        for name, c in head_part[1]:
            contributions[name].append(c)
    del records, grads, loss, out
    if outside:
        warn_outside(module, outside)
    exact_names = [n for n in chosen if n in outside or n in leftover or n in unsplit]
    if exact_names:
        exact = guarded_per_sample_grads(module, batch, [f"^{re.escape(n)}$" for n in exact_names],
                                         forward=forward, train_mode=train_mode)
        for n in exact_names:                # the exact gradient holds the hooked uses too: it replaces them
            contributions[n] = [exact.grads[n].flatten(1).float()]
    return EngineRun(contributions, {n: _shape(p) for n, p in chosen.items()}, B if seg is None else seg.n,
                     exact_names, batch["input_ids"].device)


def _lean_loss(out: LeanOutput, batch: dict, chosen: dict) -> tuple[LeanOutput, tuple]:
    """The lean path's loss input and the head's contributions. The loss runs on the head's detached
    weight (the gradient still reaches the hidden states, and no edge into a tied weight is seen as a
    use outside its modules); the head's weight gets a `HeadFactor` over (hidden, weight, labels),
    with each token's weight in sum_i L_i, c_t = mask_t / n_i, and its bias the dense sum_t g_t."""
    hidden, head = out
    weight, bias = head_params(head)
    labels, mask = batch["labels"], batch["loss_mask"].float()
    scale = mask / mask.sum(-1, keepdim=True).clamp(min=1.0) * (labels != IGNORE_INDEX)
    by_id = {id(p): n for n, p in chosen.items()}
    parts = []
    if id(weight) in by_id or (bias is not None and id(bias) in by_id):
        h = hidden.detach().to(weight.dtype)
        factor = HeadFactor(h, weight, bias, labels, chunked_logsumexp(h, weight, bias), scale)
        if id(weight) in by_id:
            parts.append((by_id[id(weight)], factor))
        if bias is not None and id(bias) in by_id:
            parts.append((by_id[id(bias)], factor.bias_grad()))
    detached = (weight.detach(), None if bias is None else bias.detach())
    return LeanOutput(hidden, detached), (head if isinstance(head, nn.Module) else None, parts)


def norms_squared(run: EngineRun) -> torch.Tensor:
    """[B] float32 squared per-sample gradient norm over the captured parameters."""
    total = torch.zeros(run.batch_size, device=run.device)
    for name, parts in run.contributions.items():
        factors = [c for c in parts if isinstance(c, Factor)]
        if not parts:
            continue
        if len(factors) < len(parts):                       # dense pieces: materialise the parameter
            sq = run.materialise(name).pow(2).sum(1)
        else:
            n = len(factors)
            ghost = n * n * max(f.ghost_cost() for f in factors)
            if ghost < n * max(f.materialise_cost() for f in factors):
                sq = sum(ghost_inner(f, g) * (1 if i == j else 2)
                         for i, f in enumerate(factors) for j, g in enumerate(factors) if j >= i)
            elif any(isinstance(f, HeadFactor) for f in factors):    # materialised a vocabulary chunk at a time
                head = next(f for f in factors if isinstance(f, HeadFactor))
                sq = 0
                for v0, v1, r in head.row_chunks():
                    block = r.transpose(1, 2) @ head.cols
                    for f in factors:
                        if f is not head:
                            block = block + f.materialise_slice(v0, v1)
                    sq = sq + block.pow(2).sum((1, 2))
            else:
                sq = run.materialise(name).pow(2).sum(1)
        total = total + sq
    return total


def per_sample_grad_norms(module: nn.Module, batch: dict, params: ParamSpec = "all",
                          forward: Callable = default_forward, chunk_size: Optional[int] = None,
                          train_mode: bool = False, call: Optional[Callable] = None, lean: bool = False) -> torch.Tensor:
    """[B] exact L2 norms of each sample's gradient over the chosen parameters (float32); `lean`: see `capture`."""
    parts, index = [], []
    for part, samples in chunks(batch, chunk_size):
        parts.append(norms_squared(capture(module, part, params, forward, train_mode, call, lean)))
        index.append(samples)
    return assemble(parts, index, batch_samples(batch)).clamp(min=0).sqrt()


Target = Union[dict, torch.Tensor]


def split_target(target: Target, shapes: dict) -> tuple[dict, bool]:
    """name -> [K, numel] float32 from a dict (name -> param shape, or [K, *shape]) or a flat
    vector [P] / matrix [K, P] in the order of the chosen parameters; and whether K was given."""
    numels = {n: int(torch.Size(s).numel()) for n, s in shapes.items()}
    if isinstance(target, dict):
        missing = [n for n in shapes if n not in target]
        if missing:
            raise ValueError(f"target gradient lacks {missing[:4]} (it needs every chosen parameter)")
        out = {n: target[n].detach().float().reshape(-1, numels[n]) for n in shapes}
        multi = any(target[n].dim() == len(shapes[n]) + 1 for n in shapes)
        return out, multi
    flat = target.detach().float()
    multi = flat.dim() == 2
    flat = flat.reshape(-1, flat.shape[-1])
    if flat.shape[1] != sum(numels.values()):
        raise ValueError(f"flat target has {flat.shape[1]} entries, the chosen parameters {sum(numels.values())}")
    return dict(zip(numels, flat.split(list(numels.values()), dim=1))), multi


def dots(run: EngineRun, target: dict) -> torch.Tensor:
    """[B, K] of <g_i, target_k> summed over the captured parameters."""
    K = next(iter(target.values())).shape[0]
    total = torch.zeros(run.batch_size, K, device=run.device)
    for name, parts in run.contributions.items():
        t = target[name].to(run.device)
        for c in parts:
            if not isinstance(c, Factor):
                total = total + c @ t.T
                continue
            W = t.view(K, c.num_rows, -1)
            if K > 1 and c.batch * c.num_rows * c.cols.shape[2] <= 2 ** 26:
                total = total + c.materialise().flatten(1) @ t.T
            elif c.onehot:
                total = total + torch.stack([c.per_sample((W[k][c.rows] * c.cols).sum(2)) for k in range(K)], 1)
            elif isinstance(c, HeadFactor):          # sum_t g_t^T W h_t, a vocabulary chunk at a time (padded rows)
                for v0, v1, r in c.row_chunks():
                    total = total + torch.stack([((r @ W[k][v0:v1]) * c.cols).sum((1, 2)) for k in range(K)], 1)
            else:
                total = total + torch.stack([c.per_sample(((c.rows @ W[k]) * c.cols).sum(2)) for k in range(K)], 1)
    return total


def per_sample_grad_dots(module: nn.Module, batch: dict, target: Target, params: ParamSpec = "all",
                         forward: Callable = default_forward, chunk_size: Optional[int] = None,
                         train_mode: bool = False, call: Optional[Callable] = None, lean: bool = False) -> torch.Tensor:
    """<g_i, target> for every sample: [B] for one target, [B, K] for K targets (float32). `target`:
    name -> tensor (the parameter's shape, or [K, *shape]) or a flat [P] / [K, P] vector in the
    order of `select_params(module, params)` (as `PerSampleGrads.flat()` and `batch_grad` give).
    `lean`: see `capture`."""
    shapes = {n: _shape(p) for n, p in select_params(module, params).items()}
    split, multi = split_target(target, shapes)
    parts, index = [], []
    for part, samples in chunks(batch, chunk_size):
        parts.append(dots(capture(module, part, params, forward, train_mode, call, lean), split))
        index.append(samples)
    out = assemble(parts, index, batch_samples(batch))
    return out if multi else out[:, 0]


def batch_grad(module: nn.Module, batch: dict, params: ParamSpec = "all", forward: Callable = default_forward,
               reduction: str = "mean", train_mode: bool = False) -> dict:
    """name -> gradient of the mean (or sum) of the batch's per-sample losses: a target for
    `per_sample_grad_dots` (e.g. the gradient of a validation set, TracIn / GREATS)."""
    chosen = {n: p.detach().requires_grad_() for n, p in select_params(module, params).items()}
    with eval_mode(module, not train_mode), torch.enable_grad():
        call = lambda *a, **kw: functional_call(module, chosen, a, kw)  # noqa: E731
        losses = sample_losses(forward(call, batch), batch, Segments.of(batch))
        loss = losses.mean() if reduction == "mean" else losses.sum()
        grads = torch.autograd.grad(loss, list(chosen.values()), allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g.detach()) for (n, p), g in zip(chosen.items(), grads)}
