"""Per-token loss -> per-sample loss -> sample and token weights -> the scalar to backpropagate.

A batch is a dict of tensors: `input_ids`, `labels` and `loss_mask` ([B, T], labels aligned with
inputs, mask 1 on label tokens and 0 on padding or prompt tokens), `position_ids` ([B, T]), and
`sample_id`, `domain` ([B]).

The reduction (`reduction=`):

    token   (default)  L = sum_i s_i sum_t u_it m_it l_it / sum_i s_i sum_t u_it m_it
    sample             L = sum_i s_i lbar_i / sum_i s_i,  lbar_i = sum_t u_it m_it l_it / sum_t u_it m_it

with m the loss mask, s_i >= 0 sample weights and u_it >= 0 token weights (both 1 when no plugin
sets them). With all weights 1, `token` is exactly the mean over label tokens that HF Trainer,
Megatron and a plain `F.cross_entropy(..., ignore_index)` loop compute, and `sample` is the mean of
per-sample means (Sow et al.'s README form). Both normalise by the weights' own total, so scaling
every weight by a constant changes nothing.

A packed batch (`dataflex.core.packing`: several samples a row, `segment_ids`, `sample_id` per sample)
gives the same per-sample quantities: i runs over samples, not rows, and each sample's sums run over
its own token slots; sample weights [S] and token weights [S, T] (a sample's token p at column p, the
layout of its padded row) are per sample as before.

The loss starts from the logits, or from the last hidden states and the output head (the lean path,
`dataflex.core.lean_loss`: no [B, T, V] tensor); everything after the per-token loss is the same.

Under data parallelism the denominator is the global one: each rank returns its numerator over
(global denominator / world size), so the usual average of gradients over ranks is the gradient
of the global loss. Non-finite token losses (NaN, inf) get weight 0 in every reduction and
contribute exactly 0 to the value and the gradient of the loss, never NaN.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from dataflex.core.lean_loss import LeanOutput, linear_cross_entropy
from dataflex.core.packing import Segments

REDUCTIONS = ("token", "sample")


def per_token_loss(logits: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None, *,
                   hidden: Optional[torch.Tensor] = None, head=None, chunk_size: Optional[int] = None,
                   grad_hint: Optional[torch.Tensor] = None, hint_of_loss=None) -> torch.Tensor:
    """Cross-entropy of every position, [B, T], float32. From the logits [B, T, V], or (the lean
    path) from the last hidden states and the output head, `hidden=`/`head=` or a `LeanOutput` in
    place of the logits: chunk by chunk, no [B, T, V] tensor (dataflex.core.lean_loss), same values.
    `grad_hint` (lean path only; `loss_grad_hint`): the weights are known before the losses, so the
    lean path forms its gradients in the forward (3 head matmuls, no recomputation); `hint_of_loss`: a factor of
    the token weights computed elementwise from each token's own loss (`linear_cross_entropy`)."""
    if isinstance(logits, LeanOutput):
        hidden, head = logits
    if hidden is not None:
        if head is None:
            raise ValueError("per_token_loss(hidden=...) needs the output head (head=module, weight or (weight, bias))")
        return linear_cross_entropy(hidden, head, labels, chunk_size=chunk_size, grad_hint=grad_hint,
                                    hint_of_loss=hint_of_loss)
    logits = getattr(logits, "logits", logits)      # HF ModelOutput
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), reduction="none").view(B, T)


def per_sample_from_token_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's label tokens; a sample with no label token has loss 0."""
    mask = loss_mask.to(token_loss.dtype)
    return (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return per_sample_from_token_loss(per_token_loss(logits, labels), loss_mask)


def finite_tokens(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss with non-finite entries replaced by 0, float mask of finite label tokens).
    `torch.where` routes an exact zero gradient to the replaced entries."""
    finite = torch.isfinite(token_loss.detach())
    safe = torch.where(finite, token_loss, torch.zeros((), dtype=token_loss.dtype, device=token_loss.device))
    return safe, loss_mask.to(safe.dtype) * finite.to(safe.dtype)


def _weights(mask: torch.Tensor, sample_weights: Optional[torch.Tensor], token_weights: Optional[torch.Tensor],
             segments: Optional[Segments]) -> tuple:
    """(u, s): the token weights times the mask, laid out as the rows ([B, T], or packed [R, T]), and the sample
    weights ([samples]; ones when none), in the mask's dtype."""
    if segments is not None:
        u = mask if token_weights is None else mask * segments.pack(token_weights.to(mask))
        n = segments.n
    else:
        u = mask if token_weights is None else mask * token_weights.to(mask)
        n = mask.shape[0]
    s = torch.ones(n, dtype=mask.dtype, device=mask.device) if sample_weights is None else sample_weights.to(mask)
    return u, s


def reduce_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor, sample_weights: Optional[torch.Tensor] = None,
                token_weights: Optional[torch.Tensor] = None, reduction: str = "token",
                denominator: Optional[torch.Tensor] = None, segments: Optional[Segments] = None) -> torch.Tensor:
    """The formula of the module docstring. `denominator` replaces the local one (data parallelism:
    the global denominator divided by the world size). `segments`: the token loss and mask are packed
    rows [R, T]; sample weights are per sample [S], token weights per sample [S, T]."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
    loss, mask = finite_tokens(token_loss, loss_mask)
    u, s = _weights(mask, sample_weights, token_weights, segments)
    if reduction == "token":
        s_tok = segments.spread(s) if segments is not None else s.unsqueeze(1)
        num = (s_tok * u * loss).sum()
        den = (s_tok * u).sum() if denominator is None else denominator
    else:
        if segments is not None:
            per_sample = segments.sum(u * loss) / segments.sum(u).clamp(min=torch.finfo(loss.dtype).tiny)
        else:
            per_sample = (u * loss).sum(-1) / u.sum(-1).clamp(min=torch.finfo(loss.dtype).tiny)
        num = (s * per_sample).sum()
        den = s.sum() if denominator is None else denominator
    den = torch.as_tensor(den, dtype=loss.dtype, device=loss.device)
    return num / den.clamp(min=torch.finfo(loss.dtype).tiny)


def loss_grad_hint(loss_mask: torch.Tensor, sample_weights: Optional[torch.Tensor] = None,
                   token_weights: Optional[torch.Tensor] = None, reduction: str = "token",
                   segments: Optional[Segments] = None) -> torch.Tensor:
    """d reduce_loss / d token_loss up to one scalar factor (the denominator, the upstream gradient), when
    every token loss is finite: `s_i u_it m_it` (token reduction) or `s_i u_it m_it / sum_t u_it m_it`
    (sample). Known before the forward when the weights are (they are not computed from its losses):
    the lean path's `grad_hint`. A non-finite token changes the sample reduction's normalisers; the lean
    backward sees its gradient is then not a multiple of the hint and recomputes."""
    mask = loss_mask.float()
    u, s = _weights(mask, sample_weights, token_weights, segments)
    if reduction == "sample":
        total = segments.sum(u) if segments is not None else u.sum(-1)
        s = s / total.clamp(min=torch.finfo(mask.dtype).tiny)
    s_tok = segments.spread(s) if segments is not None else s.unsqueeze(1)
    return (s_tok * u).detach()


def weighted_mean(per_sample: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """mean_i(w_i * l_i): with mean-1 weights, all-ones is the plain mean of per-sample losses."""
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample.dtype) * per_sample).mean()


class LossWrapper:
    """Turns model outputs into the training scalar and records the per-sample signal.

    `weigh(signal, batch) -> dict | None` is where a run's plugins come in (the DataFlex session
    gathers the signal across ranks there). `signal` holds the local batch's detached
    `loss` ([b] mean over finite label tokens), `tokens` ([b] finite label-token counts), `labels`
    ([b] label tokens), `token_loss` and `token_mask` ([b, T]; on a packed batch only while
    `token_signal` is True). b counts samples, also on a packed batch. The answer may hold `sample_weights` [b],
    `token_weights` [b, T] and `denominator` (see `reduce_loss`). Without `weigh`, every weight is 1
    and the denominator is local. After each call `last` holds the local detached per-sample losses,
    ids, domains and the sample weights used.
    """

    def __init__(self, weigh: Optional[Callable[[dict, dict], Optional[dict]]] = None, reduction: str = "token"):
        if reduction not in REDUCTIONS:
            raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.weigh = weigh
        self.reduction = reduction
        self.token_signal = True     # packed batches: unpack token losses into the signal ([S, T]) only when read
        # `known_weights(batch) -> dict | None`: the answer `weigh` will give for this batch when it is known before
        # the batch's losses (not computed from them), None when it is not. The lean path then forms its gradients
        # in the forward (`loss_grad_hint`). Without `weigh`, every weight is 1 and known. The answer may add
        # `token_weights_of_loss`: a function giving, elementwise, a factor of each token's weight from its own
        # loss (focal's; token reduction only, where the normaliser is one scalar). A wrong answer costs time
        # (the backward recomputes), never a wrong gradient.
        self.known_weights: Optional[Callable[[dict], Optional[dict]]] = None
        self.last: dict = {}

    def __call__(self, logits=None, batch: Optional[dict] = None, *, hidden: Optional[torch.Tensor] = None,
                 head=None) -> torch.Tensor:
        """`logits` [B, T, V] (or an HF output), or the lean path: `hidden=` [B, T, H] and `head=`
        (or a `dataflex.core.lean_loss.LeanOutput` as `logits`); the same scalar and gradients either way."""
        if batch is None:
            raise TypeError("flex.loss(outputs, batch): the batch is missing")
        hint = of_loss = None
        if hidden is not None or isinstance(logits, LeanOutput):
            known = {} if self.weigh is None else (self.known_weights(batch) if self.known_weights else None)
            of_loss = None if known is None else known.get("token_weights_of_loss")
            if known is not None and (of_loss is None or self.reduction == "token"):
                hint = loss_grad_hint(batch["loss_mask"], known.get("sample_weights"), known.get("token_weights"),
                                      self.reduction, Segments.of(batch))
        return self.from_token_loss(per_token_loss(logits, batch["labels"], hidden=hidden, head=head, grad_hint=hint,
                                                   hint_of_loss=of_loss), batch)

    def from_token_loss(self, token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Entry point for Megatron-core's `loss_func`, whose output tensor is the per-token loss.
        On a packed batch every per-sample quantity is per sample (segment), not per row."""
        answer = self.weigh_token_loss(token_loss.detach(), batch)
        return reduce_loss(token_loss, batch["loss_mask"], answer.get("sample_weights"), answer.get("token_weights"),
                           self.reduction, answer.get("denominator"), Segments.of(batch))

    def weigh_token_loss(self, token_loss: torch.Tensor, batch: dict) -> dict:
        """The signal of a batch's (detached) per-token loss, given to `weigh`; returns its answer
        (`sample_weights`, `token_weights`, `denominator`, each optional) and sets `last`. Gradient
        accumulation weighs the whole batch once, then reduces each micro-batch with its slice."""
        seg = Segments.of(batch)
        safe, mask = finite_tokens(token_loss.detach(), batch["loss_mask"])
        total = (lambda x: x.sum(-1)) if seg is None else seg.sum
        tokens, labels = total(mask), total(batch["loss_mask"].to(mask))
        per_sample = total(safe * mask) / tokens.clamp(min=1.0)
        per_sample = torch.where(tokens > 0, per_sample, _all_nonfinite(labels, per_sample))
        signal = {"loss": per_sample, "tokens": tokens, "labels": labels}
        if seg is None:
            signal.update(token_loss=safe, token_mask=mask)
        elif self.token_signal:          # per sample, [S, T]: what a padded batch gives
            signal.update(token_loss=seg.unpack(safe), token_mask=seg.unpack(mask))
        answer = (self.weigh(signal, batch) if self.weigh else None) or {}
        weights = answer.get("sample_weights")
        self.last = {"loss": per_sample, "sample_id": batch.get("sample_id"), "domain": batch.get("domain"),
                     "weight": weights}
        return answer


def _all_nonfinite(labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The per-sample loss of a sample without a finite label token: NaN when it has label tokens
    (all non-finite), 0 when it has none (nothing to learn, as before)."""
    nan = torch.full(labels.shape, float("nan"), dtype=like.dtype, device=like.device)
    return torch.where(labels > 0, nan, torch.zeros_like(nan))


def el2n_tokens(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, T] the L2 error ||p - e_y|| of every position, float64."""
    p = torch.softmax(logits.double(), -1)
    err = p.pow(2).sum(-1) - 2 * p.gather(-1, labels.unsqueeze(-1)).squeeze(-1) + 1
    return err.clamp(min=0).sqrt()


def el2n(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """[B] mean over label tokens of the L2 error ||p - e_y||."""
    mask = loss_mask.double()
    return (el2n_tokens(logits, labels) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
