"""Per-token cross-entropy from the last hidden states and the output head, chunk by chunk.

    token_loss = linear_cross_entropy(hidden, head, labels)      # [B, T] float32, like per_token_loss

`hidden` is [B, T, H] (or [N, H]), `head` an `nn.Linear`-like module (`weight` [V, H], optional
`bias`), a weight tensor, or a `(weight, bias)` pair; labels equal to `ignore_index` (-100) give
loss 0 and no gradient, as `F.cross_entropy` does. The result equals
`F.cross_entropy(head(hidden).float(), labels, reduction="none")`, but no `[B, T, V]` tensor (and
no `[N, V]` float32 copy) ever exists: the forward computes each chunk of tokens' logits, keeps
only their log-sum-exp ([N] floats), and the backward recomputes each chunk's logits to form
`g_i (softmax_i - onehot_i)`. The upstream gradient `g` is per token, so sample weights, token
weights and any reduction are applied on the per-token output (`dataflex.loss.reduce_loss`), and
the gradient reaches the hidden states and the head's weight and bias (tied or untied).

Memory: the loss holds two chunk buffers ([chunk, V] float32, plus one in the model's dtype when
that is not float32) and, in the backward, the weight's gradient. Compute: one extra logits
matmul in the backward (4 head-sized matmuls instead of 3). When the head is frozen (LoRA) and
the hidden states need a gradient, the forward forms `(softmax - onehot) W` per token already
([N, H] floats) and the backward only scales it: 2 matmuls, no recomputation.

Non-finite tokens: a token whose logits hold NaN or inf has a NaN or inf loss, as on the logits
path, and `reduce_loss` gives it weight 0; its gradient here is exactly 0 (its row of
`softmax - onehot` and its hidden row are zeroed), where the logits path's cross-entropy backward
multiplies NaN by 0 and spreads NaN into the head's gradient.

Fused CUDA kernels: Liger-Kernel's `LigerFusedLinearCrossEntropyFunction(reduction="none")`
forms the weight's gradient in the forward and scales it by the upstream gradient as by a scalar
in the backward, so its gradients are wrong for any non-uniform per-token weight; it is not used.
This chunked implementation runs on every device (CUDA included).
"""
from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

import torch

IGNORE_INDEX = -100
# bytes of one [chunk, V] float32 buffer (allocated once per forward and once per backward)
CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}


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


def default_chunk(n_tokens: int, vocab: int, device: torch.device) -> int:
    env = os.environ.get("DATAFLEX_LEAN_CHUNK")
    if env:
        return max(1, min(n_tokens, int(env)))
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, min(n_tokens, budget // (4 * vocab)))


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


def _softmax_minus_onehot(buf: torch.Tensor, lse: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                          dead: torch.Tensor) -> torch.Tensor:
    """buf (logits, float32) <- scale_i (softmax_i - onehot_i), rows in `dead` exactly 0."""
    buf.sub_(lse.unsqueeze(1)).exp_()
    rows = torch.arange(buf.shape[0], device=buf.device)
    buf[rows, labels] -= 1.0
    buf.mul_(scale.unsqueeze(1))
    if bool(dead.any()):
        buf[dead] = 0.0
    return buf


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `hidden @ weight.T + bias` ([N, H] hidden, [N] labels), chunked."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, ignore_index: int, grad_enabled: bool = True):
        N, _ = hidden.shape
        V = weight.shape[0]
        device = hidden.device
        valid = labels != ignore_index
        safe = torch.where(valid, labels, torch.zeros((), dtype=labels.dtype, device=device))
        lse = torch.empty(N, dtype=torch.float32, device=device)
        loss = torch.empty(N, dtype=torch.float32, device=device)
        rows = min(chunk, N) if N else 1
        buf = torch.empty(rows, V, dtype=torch.float32, device=device)
        low = None if hidden.dtype == torch.float32 else torch.empty(rows, V, dtype=hidden.dtype, device=device)
        # a frozen head (LoRA): form d loss_i / d hidden_i now and never recompute the logits
        early = grad_enabled and hidden.requires_grad and not weight.requires_grad \
            and not (bias is not None and bias.requires_grad)
        grad_dir = torch.empty(N, hidden.shape[1], dtype=torch.float32, device=device) if early else None
        for s in range(0, N, rows):
            e = min(N, s + rows)
            n = e - s
            logits = _logits(hidden[s:e], weight, bias, buf[:n], None if low is None else low[:n])
            target = logits.gather(1, safe[s:e].unsqueeze(1)).squeeze(1)
            m = logits.amax(1)
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))   # +-inf rows: NaN/inf below, as log_softmax
            total = logits.sub_(m.unsqueeze(1)).exp_().sum(1)
            lse[s:e] = m + total.log()
            loss[s:e] = torch.where(valid[s:e], lse[s:e] - target, torch.zeros((), device=device))
            if early:
                logits.div_(total.unsqueeze(1))          # softmax
                r = torch.arange(n, device=device)
                logits[r, safe[s:e]] -= 1.0
                dead = ~(valid[s:e] & torch.isfinite(lse[s:e]))
                if bool(dead.any()):
                    logits[dead] = 0.0
                d = logits if low is None else low[:n].copy_(logits)
                grad_dir[s:e] = torch.mm(d, weight)
        ctx.chunk, ctx.early, ctx.has_bias = rows, early, bias is not None
        if early:
            ctx.save_for_backward(grad_dir, valid, lse)
        else:
            ctx.save_for_backward(hidden, weight, bias, safe, valid, lse)
        ctx.hidden_dtype = hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.early:
            grad_dir, valid, lse = ctx.saved_tensors
            g = torch.where(valid & torch.isfinite(lse), grad_loss.float(), torch.zeros((), device=grad_loss.device))
            return (grad_dir * g.unsqueeze(1)).to(ctx.hidden_dtype), None, None, None, None, None, None
        hidden, weight, bias, safe, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, H = hidden.shape
        V = weight.shape[0]
        device = hidden.device
        finite = torch.isfinite(lse)
        g = torch.where(valid & finite, grad_loss.float(), torch.zeros((), device=device))
        rows = ctx.chunk
        buf = torch.empty(rows, V, dtype=torch.float32, device=device)
        low = None if hidden.dtype == torch.float32 else torch.empty(rows, V, dtype=hidden.dtype, device=device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(V, H, dtype=torch.float32, device=device) if need_w else None
        grad_b = torch.zeros(V, dtype=torch.float32, device=device) if need_b and bias is not None else None
        for s in range(0, N, rows):
            e = min(N, s + rows)
            n = e - s
            h = hidden[s:e]
            dead = ~finite[s:e]
            logits = _logits(h, weight, bias, buf[:n], None if low is None else low[:n])
            d32 = _softmax_minus_onehot(logits, lse[s:e], safe[s:e], g[s:e], dead)
            d = d32 if low is None else low[:n].copy_(d32)
            if need_h:
                torch.mm(d, weight, out=grad_h[s:e])
            if need_w:
                if bool(dead.any()):                       # a NaN hidden row times a zero row is NaN
                    h = torch.where(dead.unsqueeze(1), torch.zeros((), dtype=h.dtype, device=device), h)
                if low is None:
                    grad_w.addmm_(d.t(), h)
                else:
                    grad_w.add_(torch.mm(d.t(), h))
            if grad_b is not None:
                grad_b.add_(d32.sum(0))
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                         chunk_size: Optional[int] = None) -> torch.Tensor:
    """Per-token cross-entropy, float32, shaped like `labels` (see the module docstring)."""
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
    chunk = chunk_size or default_chunk(flat.shape[0], weight.shape[0], flat.device)
    loss = ChunkedLinearCrossEntropy.apply(flat, weight, bias, labels.reshape(-1), int(chunk),
                                          int(ignore_index), torch.is_grad_enabled())
    return loss.view(labels.shape)


def lean_forward(forward, call, batch: dict) -> Optional[LeanOutput]:
    """The training forward's `LeanOutput` (hidden states and head) where the model offers one:
    HF and peft causal LMs (`dataflex.hf.hf_forward(lean=True)`) and modules whose forward takes
    `lean=` (TinyGPT); None otherwise (the caller takes the logits path). Under DeepSpeed ZeRO-3
    the head's weight is partitioned outside the engine's forward: None there too."""
    stage = getattr(call, "zero_optimization_stage", None)
    if callable(stage) and stage() == 3:
        return None
    module = call
    while hasattr(module, "module") and isinstance(getattr(module, "module"), torch.nn.Module):
        module = module.module
    from .hf import hf_forward, is_hf_model
    if is_hf_model(module):
        keywords = dict(getattr(forward, "keywords", None) or {})
        keywords.pop("lean", None)
        return hf_forward(call, batch, lean=True, **keywords)
    import inspect
    if "lean" in inspect.signature(module.forward).parameters:
        return call(batch["input_ids"], position_ids=batch.get("position_ids"), lean=True)
    return None
