"""Per-token cross-entropy from the last hidden states and the output head, chunk by chunk.

    token_loss = linear_cross_entropy(hidden, head, labels)      # [B, T] float32, like per_token_loss

`hidden` is [B, T, H] (or [N, H]), `head` an `nn.Linear`-like module (`weight` [V, H], optional `bias`), a
weight tensor, or a `(weight, bias)` pair; labels equal to `ignore_index` (-100) give loss 0 and no gradient.
The result equals `F.cross_entropy(head(hidden).float(), labels, reduction="none")`, but no `[B, T, V]`
tensor (nor an `[N, V]` float32 copy) exists: the logits are computed in [tokens, vocabulary] chunks. Weights
and reductions apply to the per-token output (`dataflex.core.loss.reduce_loss`); the gradient reaches the
hidden states and the head's weight and bias (tied or untied).

Which computation runs (the same values and gradients, fp32 to 1e-5, from each; the table with what selects
each is in docs/concepts/interface-and-gradient-engine.md, "The lean loss"):

- weights known before the losses (`grad_hint`), optionally times an elementwise function of each token's own
  loss (`hint_of_loss`, focal): the forward forms `d_t = c_t (softmax_t - onehot_t)`, `d W` and `d^T h` in
  whole-vocabulary chunks of at least `WHOLE_VOCAB_MIN_ROWS` tokens (3 head-sized matmuls) and the backward
  scales them by one scalar, after checking that its gradient is that scalar times the hint on every label
  token (to `HINT_RTOL`); when it is not, it recomputes exactly (a wrong hint costs time, never exactness).
- weights computed from all the losses, or no hint: the forward keeps each token's log-sum-exp (an online
  log-sum-exp over vocabulary chunks) and the backward recomputes each chunk's logits (4 matmuls).
- a frozen head (LoRA) with hidden states that need a gradient: the forward forms `(softmax - onehot) W` per
  token and the backward scales it by each token's gradient (2 matmuls).

Memory: one chunk buffer (`CHUNK_BYTES` of float32, and its copy in the model's dtype if not float32) and, with
a hint, the gradients formed in the forward. A token whose logits hold NaN or inf has a non-finite loss (weight 0
in `reduce_loss`) and a gradient of exactly 0. No fused CUDA kernel is used (why: the docs page above).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import torch

IGNORE_INDEX = -100
# bytes of one [chunk, V] float32 buffer (allocated once per forward and once per backward)
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}
# whole-vocabulary chunks (gradients formed in the forward) hold at least this many tokens: below it the three
# head matmuls lose their large dimension (on a 2-core CPU at V = 128k, 128-token blocks made them ~20% slower
# than 256-token ones); the chunk buffer then exceeds CHUNK_BYTES above V = 64k (128 MiB at V = 128k)
WHOLE_VOCAB_MIN_ROWS = 256


class LeanOutput(NamedTuple):
    """What a model's forward returns for the lean loss: the last hidden states (after the final
    norm, [B, T, H]) and the output head (module, weight or (weight, bias)). `flex.loss` and
    `per_token_loss` accept it wherever they accept logits."""
    hidden: torch.Tensor
    head: Any


def head_params(head) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [V, H], bias [V] or None) of an output head: a tensor, a (weight, bias) pair, or a
    module whose `weight` is what its forward multiplies by. A peft adapter on the head itself
    (LoRA on lm_head) changes the weight its forward uses: refused, use the logits path."""
    if isinstance(head, torch.Tensor):
        return head, None
    if isinstance(head, (tuple, list)):
        weight, bias = (tuple(head) + (None,))[:2]
        return weight, bias
    if hasattr(head, "base_layer") or hasattr(head, "lora_A") or hasattr(head, "modules_to_save"):
        raise ValueError(f"the lean loss needs a plain linear output head; {type(head).__name__} wraps it "
                         "(a peft adapter on the head): use the logits path (trainer.lean_loss=false)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"the lean loss needs an output head with a [V, H] weight, got {type(head).__name__}")
    return weight, getattr(head, "bias", None)


def usable_head(head) -> bool:
    """Whether the lean loss can take this head: `head_params` accepts it, or it is a plain module whose
    weight is a DeepSpeed ZeRO-3 partition (gathered by calling the module: `linear_cross_entropy`)."""
    try:
        head_params(head)
        return True
    except ValueError:
        return isinstance(head, torch.nn.Module) and hasattr(getattr(head, "weight", None), "ds_id") \
            and not any(hasattr(head, a) for a in ("base_layer", "lora_A", "modules_to_save"))


def chunk_shape(n_tokens: int, vocab: int, device: torch.device, rows: Optional[int] = None,
                cols: Optional[int] = None) -> tuple[int, int]:
    """(tokens, vocabulary entries) of one logits chunk: a [rows, cols] float32 buffer within the
    device's budget, tokens first (up to 4096), so that every matmul keeps one large dimension.
    DATAFLEX_LEAN_CHUNK=ROWSxCOLS overrides."""
    env = os.environ.get("DATAFLEX_LEAN_CHUNK")
    if env and rows is None and cols is None:
        r, _, c = env.partition("x")
        rows, cols = int(r), int(c) if c else None
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // 4
    rows = rows or max(1, budget // min(vocab, 4096))
    rows = max(1, min(n_tokens, rows))
    cols = max(1, min(vocab, cols or budget // rows))
    return rows, cols


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out32: torch.Tensor,
            low: Optional[torch.Tensor]) -> torch.Tensor:
    """out32 <- float32(h W^T + b), computed in the model's dtype as `nn.Linear` would, then upcast
    as `per_token_loss` does."""
    target = out32 if low is None else low
    if bias is None:
        torch.mm(h, weight.t(), out=target)
    else:
        torch.addmm(bias, h, weight.t(), out=target)
    if low is not None:
        out32.copy_(low)
    return out32


def _views(flat32: torch.Tensor, flat_low: Optional[torch.Tensor], n: int, c: int):
    return flat32[:n * c].view(n, c), None if flat_low is None else flat_low[:n * c].view(n, c)


def _label_in(labels: torch.Tensor, v0: int, v1: int):
    """(rows whose label falls in [v0, v1), their column inside the chunk)."""
    rows = torch.nonzero((labels >= v0) & (labels < v1)).squeeze(1)
    return rows, labels[rows] - v0


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T + bias` ([N, H] hidden, [N] labels), in
    [rows, cols] chunks of the logits: an online log-sum-exp over vocabulary chunks in the forward;
    the backward recomputes each chunk and writes its slice of the weight's gradient once."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, rows: int, cols: int, ignore_index: int, grad_enabled: bool,
                hint: Optional[torch.Tensor] = None, whole_rows: int = 1, of_loss=None):
        N, H = hidden.shape
        V = weight.shape[0]
        device = hidden.device
        zero = torch.zeros((), device=device)
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros((), dtype=labels.dtype, device=device))
        lse = torch.empty(N, dtype=torch.float32, device=device)
        target = torch.zeros(N, dtype=torch.float32, device=device)
        need_h = grad_enabled and hidden.requires_grad
        need_w = grad_enabled and weight.requires_grad
        need_b = grad_enabled and bias is not None and bias.requires_grad
        # a frozen head (LoRA): d loss_i / d hidden_i formed now, per token, no recomputation (any upstream gradient)
        early = need_h and not need_w and not need_b
        # the upstream gradient known up to one scalar (`hint`): every gradient formed now, 3 matmuls, no recomputation
        fused = hint is not None and not early and (need_h or need_w or need_b)
        if early or fused:                          # whole-vocabulary chunks: the softmax is complete in one
            rows, cols = whole_rows, V
        flat = torch.empty(rows * cols, dtype=torch.float32, device=device)
        lowp = hidden.dtype != torch.float32
        flat_low = torch.empty(rows * cols, dtype=hidden.dtype, device=device) if lowp else None
        grad_dir = torch.empty(N, H, dtype=torch.float32, device=device) if (early or fused) and need_h else None
        grad_w = grad_b = None
        if fused:
            coef = hint.to(device=device, dtype=torch.float32)
            if of_loss is not None:                 # times each token's weight from its own loss, chunk by chunk
                coef = coef.clone()
            one_block = rows >= N
            if need_w:
                grad_w = torch.empty_like(weight) if one_block else torch.empty(V, H, dtype=torch.float32, device=device)
            if need_b:
                grad_b = torch.zeros(V, dtype=torch.float32, device=device)
        for s in range(0, N, rows):
            e = min(N, s + rows)
            n, h, lab = e - s, hidden[s:e], safe[s:e]
            m = torch.full((n,), float("-inf"), device=device)
            total = torch.zeros(n, device=device)
            for v0 in range(0, V, cols):
                v1 = min(V, v0 + cols)
                out32, low = _views(flat, flat_low, n, v1 - v0)
                logits = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], out32, low)
                r, c = _label_in(lab, v0, v1)
                target[s + r] = logits[r, c]
                new = torch.maximum(m, logits.amax(1))
                shift = torch.where(torch.isfinite(new), new, zero)   # +-inf / NaN rows end non-finite, as log_softmax
                total = total * torch.exp(m - shift) + logits.sub_(shift.unsqueeze(1)).exp_().sum(1)
                m = new
            shift = torch.where(torch.isfinite(m), m, zero)
            lse[s:e] = shift + total.log()
            if fused and of_loss is not None:       # this chunk's losses are complete: weigh their hint
                own = torch.where(valid[s:e], lse[s:e] - target[s:e], zero)
                coef[s:e] *= of_loss(own).to(torch.float32)
            if early or fused:                      # one vocabulary chunk: `logits` holds exp(l - shift)
                # c_t (softmax_t - onehot_t), in place, one pass: c_t = 1 (frozen head) or the hint
                scale = coef[s:e] / total if fused else total.reciprocal()
                logits.mul_(scale.unsqueeze(1))
                logits[torch.arange(n, device=device), lab] -= coef[s:e] if fused else 1.0
                dead = ~(valid[s:e] & torch.isfinite(lse[s:e]))
                any_dead = bool(dead.any())
                if any_dead:
                    logits[dead] = 0.0
                d = logits if low is None else low.copy_(logits)
                if grad_dir is not None:
                    if lowp:
                        grad_dir[s:e] = torch.mm(d, weight)
                    else:
                        torch.mm(d, weight, out=grad_dir[s:e])
                if grad_w is not None:
                    if any_dead:                    # a NaN hidden row times a zero row is NaN
                        h = torch.where(dead.unsqueeze(1), torch.zeros((), dtype=h.dtype, device=device), h)
                    if one_block or (s == 0 and not lowp):      # the first block writes, the others add
                        torch.mm(d.t(), h, out=grad_w)
                    elif s == 0:
                        grad_w.copy_(torch.mm(d.t(), h))
                    elif lowp:
                        grad_w.add_(torch.mm(d.t(), h))
                    else:
                        grad_w.addmm_(d.t(), h)
                if grad_b is not None:
                    grad_b.add_(logits.sum(0))
        loss = torch.where(valid, lse - target, zero)
        ctx.rows, ctx.cols, ctx.early, ctx.fused, ctx.hidden_dtype = rows, cols, early, fused, hidden.dtype
        if early:
            ctx.save_for_backward(grad_dir, valid, lse)
        else:
            ctx.save_for_backward(hidden, weight, bias, safe, valid, lse)
        if fused:                                   # not autograd-saved: formed here, consumed once by backward
            ctx.grads = (grad_dir, None if grad_w is None else grad_w.to(weight.dtype), grad_b, coef)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        none = (None,) * 8
        if ctx.early:
            grad_dir, valid, lse = ctx.saved_tensors
            g = torch.where(valid & torch.isfinite(lse), grad_loss.float(), torch.zeros((), device=grad_loss.device))
            return ((grad_dir * g.unsqueeze(1)).to(ctx.hidden_dtype), None, None) + none
        hidden, weight, bias, safe, valid, lse = ctx.saved_tensors
        if ctx.fused and getattr(ctx, "grads", None) is not None:
            grad_dir, grad_w, grad_b, coef = ctx.grads
            ctx.grads = None                        # scaled in place below: a second backward recomputes
            alpha = _scale_of(grad_loss.float(), coef, valid & torch.isfinite(lse))
            if alpha is not None:
                need_h, need_w, need_b = ctx.needs_input_grad[:3]
                grad_h = grad_dir.mul_(alpha).to(ctx.hidden_dtype) if need_h and grad_dir is not None else None
                grad_w = grad_w.mul_(alpha) if need_w and grad_w is not None else None
                grad_b = grad_b.mul_(alpha).to(bias.dtype) if need_b and grad_b is not None else None
                return (grad_h, grad_w, grad_b) + none
            # the upstream gradient is not a multiple of the hint (the caller also backpropagates through the
            # per-token losses, or a token's weight changed after the forward): recompute, exactly, below
        return _recompute_backward(ctx, grad_loss, hidden, weight, bias, safe, valid, lse)


# a token's upstream gradient g_t and alpha * hint_t may differ by float32 rounding (a few ulp: the weights'
# products are formed in another order); anything further apart is another gradient
HINT_RTOL = 4e-6


def _scale_of(g: torch.Tensor, hint: torch.Tensor, live: torch.Tensor) -> Optional[torch.Tensor]:
    """alpha with g_t = alpha * hint_t on every live token (label token with a finite loss; the others get no
    gradient either way), to HINT_RTOL of g_t; None when there is none. A 0-dim tensor (no host sync but one)."""
    zero = torch.zeros((), device=g.device)
    g, c = torch.where(live, g, zero), torch.where(live, hint, zero)
    j = c.abs().argmax()
    alpha = torch.where(c[j] != 0, g[j] / torch.where(c[j] != 0, c[j], torch.ones_like(c[j])), zero)
    ok = (g - alpha * c).abs() <= HINT_RTOL * g.abs()
    return alpha if bool(ok.all() & torch.isfinite(alpha)) else None


def _recompute_backward(ctx, grad_loss, hidden, weight, bias, safe, valid, lse):
    """The backward that recomputes each chunk's logits: exact for any per-token upstream gradient."""
    none = (None,) * 8
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    N, H = hidden.shape
    V = weight.shape[0]
    device = hidden.device
    rows, cols = ctx.rows, ctx.cols
    finite = torch.isfinite(lse)
    g = torch.where(valid & finite, grad_loss.float(), torch.zeros((), device=device))
    flat = torch.empty(rows * cols, dtype=torch.float32, device=device)
    lowp = hidden.dtype != torch.float32
    flat_low = torch.empty(rows * cols, dtype=hidden.dtype, device=device) if lowp else None
    one_block = rows >= N
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = None
    if need_w:   # one token block: each slice written once, in the weight's dtype, as the logits path's matmul
        grad_w = torch.empty_like(weight) if one_block else torch.empty(V, H, dtype=torch.float32, device=device)
    grad_b = torch.zeros(V, dtype=torch.float32, device=device) if need_b and bias is not None else None
    for s in range(0, N, rows):
        e = min(N, s + rows)
        n, h, lab = e - s, hidden[s:e], safe[s:e]
        dead = ~finite[s:e]
        any_dead = bool(dead.any())
        if any_dead and need_w:                     # a NaN hidden row times a zero row is NaN
            h = torch.where(dead.unsqueeze(1), torch.zeros((), dtype=h.dtype, device=device), h)
        gh = torch.zeros(n, H, dtype=torch.float32, device=device) if need_h else None
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            out32, low = _views(flat, flat_low, n, v1 - v0)
            w = weight[v0:v1]
            d32 = _logits(h, w, None if bias is None else bias[v0:v1], out32, low)
            d32.sub_(lse[s:e].unsqueeze(1)).exp_()
            r, c = _label_in(lab, v0, v1)
            d32[r, c] -= 1.0
            d32.mul_(g[s:e].unsqueeze(1))
            if any_dead:
                d32[dead] = 0.0
            d = d32 if low is None else low.copy_(d32)
            if need_h:
                if lowp:
                    gh.add_(torch.mm(d, w))
                else:
                    gh.addmm_(d, w)
            if need_w:
                if one_block or (s == 0 and not lowp):      # the first token block writes, the others add
                    torch.mm(d.t(), h, out=grad_w[v0:v1])
                elif s == 0:
                    grad_w[v0:v1].copy_(torch.mm(d.t(), h))
                elif lowp:
                    grad_w[v0:v1].add_(torch.mm(d.t(), h))
                else:
                    grad_w[v0:v1].addmm_(d.t(), h)
            if grad_b is not None:
                grad_b[v0:v1].add_(d32.sum(0))
        if need_h:
            grad_h[s:e] = gh
    grad_w = None if grad_w is None else grad_w.to(weight.dtype)
    grad_b = None if grad_b is None else grad_b.to(bias.dtype)
    return (grad_h, grad_w, grad_b) + none


@torch.no_grad()
def chunked_logsumexp(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      chunk_size: Optional[int] = None, vocab_chunk: Optional[int] = None) -> torch.Tensor:
    """[...] float32 log-sum-exp over the vocabulary of each token's logits `hidden @ weight.T + bias`
    (hidden [..., H]), computed as the loss's forward computes it (logits in the model's dtype,
    upcast, an online log-sum-exp over [tokens, vocabulary] chunks): no [N, V] tensor. What the
    gradient engine needs to recompute softmax(z_t) chunk by chunk (`dataflex.grad.factors.HeadFactor`)."""
    H = hidden.shape[-1]
    flat = hidden.reshape(-1, H).to(weight.dtype)
    N, V = flat.shape[0], weight.shape[0]
    rows, cols = chunk_shape(N, V, flat.device, chunk_size, vocab_chunk)
    buf = torch.empty(rows * cols, dtype=torch.float32, device=flat.device)
    buf_low = None if flat.dtype == torch.float32 else torch.empty(rows * cols, dtype=flat.dtype, device=flat.device)
    zero = torch.zeros((), device=flat.device)
    lse = torch.empty(N, dtype=torch.float32, device=flat.device)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        m = torch.full((e - s,), float("-inf"), device=flat.device)
        total = torch.zeros(e - s, device=flat.device)
        for v0 in range(0, V, cols):
            v1 = min(V, v0 + cols)
            out32, low = _views(buf, buf_low, e - s, v1 - v0)
            logits = _logits(flat[s:e], weight[v0:v1], None if bias is None else bias[v0:v1], out32, low)
            new = torch.maximum(m, logits.amax(1))
            shift = torch.where(torch.isfinite(new), new, zero)
            total = total * torch.exp(m - shift) + logits.sub_(shift.unsqueeze(1)).exp_().sum(1)
            m = new
        lse[s:e] = torch.where(torch.isfinite(m), m, zero) + total.log()
    return lse.view(hidden.shape[:-1])


def _through_module(module: torch.nn.Module, fn, *args):
    """`fn(*args)` run as `module(*args)`: the module's forward hooks (ZeRO-3's parameter gathering) fire."""
    module.forward = fn                    # an instance attribute: nn.Module.__call__ calls it
    try:
        return module(*args)
    finally:
        del module.forward


def linear_cross_entropy(hidden: torch.Tensor, head, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_size: Optional[int] = None, vocab_chunk: Optional[int] = None,
                         grad_hint: Optional[torch.Tensor] = None, hint_of_loss=None) -> torch.Tensor:
    """Per-token cross-entropy, float32, shaped like `labels` (see the module docstring).
    `chunk_size` tokens x `vocab_chunk` vocabulary entries per logits chunk (default: `chunk_shape`).
    `grad_hint` (shaped like `labels`): the gradient the caller will send back, known up to one scalar before
    the forward (`dataflex.core.loss.loss_grad_hint`), never trusted; `hint_of_loss` (with it): an elementwise
    function of each token's own loss that also multiplies the weights (focal's `(1 - exp(-l))^gamma`)."""
    if isinstance(head, torch.nn.Module) and hasattr(getattr(head, "weight", None), "ds_id"):
        # DeepSpeed ZeRO-3: the head's weight is a partition outside its module's call. Called through
        # the module (its forward swapped for the chunked loss for this one call), the engine's own hooks
        # gather the weight for the forward and again for the backward, and reduce-scatter its gradient
        return _through_module(head, lambda h: linear_cross_entropy(h, (head.weight, head.bias), labels,
                                                                    ignore_index, chunk_size, vocab_chunk,
                                                                    grad_hint, hint_of_loss), hidden)
    weight, bias = head_params(head)
    H = hidden.shape[-1]
    if weight.shape[-1] != H:
        raise ValueError(f"hidden size {H} does not match the head's weight {tuple(weight.shape)}")
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree")
    flat = hidden.reshape(-1, H)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    if weight.dtype != flat.dtype:                 # autocast-free mixed dtypes: compute in the weight's dtype
        flat = flat.to(weight.dtype)
    N, V = flat.shape[0], weight.shape[0]
    rows, cols = chunk_shape(N, V, flat.device, chunk_size, vocab_chunk)
    # tokens per whole-vocabulary chunk (a frozen head, or a hint): the same buffer, at least WHOLE_VOCAB_MIN_ROWS
    # unless the chunk shape is given
    explicit = chunk_size is not None or vocab_chunk is not None or bool(os.environ.get("DATAFLEX_LEAN_CHUNK"))
    whole_rows = max(1, min(N, rows * cols // V if explicit else max(rows * cols // V, WHOLE_VOCAB_MIN_ROWS)))
    if grad_hint is not None and grad_hint.shape != labels.shape:
        raise ValueError(f"grad_hint {tuple(grad_hint.shape)} must be shaped like the labels {tuple(labels.shape)}")
    hint = None if grad_hint is None else grad_hint.detach().reshape(-1)
    loss = ChunkedLinearCrossEntropy.apply(flat, weight, bias, labels.reshape(-1), rows, cols, int(ignore_index),
                                           torch.is_grad_enabled(), hint, whole_rows,
                                           None if hint is None else hint_of_loss)
    return loss.view(labels.shape)


