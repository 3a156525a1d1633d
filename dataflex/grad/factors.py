"""Per-sample gradients as factors, and their algebra: Gram matrices, ghost norms, inner products.

A hooked layer's per-sample gradient is a `Factor`, sum_t outer(rows_t, cols_t), captured by
`dataflex.grad.ghost.capture` (one forward and one backward with hooks, no weight gradient formed).

Norms (ghost norm, Goodfellow 2015; Li et al. 2021, "Large language models can be strong
differentially private learners"): for a factor, ||G_i||^2 = sum_{t,s} (r_t . r_s)(c_t . c_s),
with r_t . r_s = [x_t = x_s] for one-hot rows; O(T^2 (R + C)). Materialising G_i costs
O(T R C); like Book-Keeping (Bu et al., ICML 2023) each parameter takes the cheaper of the two.
Inner products with a target gradient W (TracIn, Pruthi et al. 2020; GREATS, Wang et al. 2024):
<G_i, W> = sum_t r_t^T W c_t, O(T R C) and linear, so tied weights need nothing special.

The lean path (`lean=True`, `TorchInterface`'s default; `dataflex.core.lean_loss`): where the model
offers its last hidden states and output head, the loss is the chunked one and the head's weight is
a `HeadFactor`: rows g_t = c_t (softmax(z_t) - onehot(y_t)) in R^V, cols h_t, the rows recomputed a
vocabulary chunk at a time from (h, W, y, log-sum-exp), so that its ghost norm
sum_{t,s} (g_t . g_s)(h_t . h_s), its chunked materialisation, its dots sum_t g_t^T W h_t, its
factored projection and its Gram with a tied embedding's one-hot rows (g_s[x_t]) need no
[B, T, V] tensor (the logits path holds the logits, their log-softmax and their gradient). Packed batches take the logits path for the head.

Packed batches: every sum over t runs over one segment's (sample's) token slots; `ghost_inner` masks the
row's T x T form to same-segment pairs and `token_sum` sums per segment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from dataflex.core.lean_loss import chunk_shape
from dataflex.core.packing import Segments


@dataclass
class Factor:
    """A per-sample matrix sum_t outer(rows_t, cols_t): rows [B, T, R] (or [B, T] indices of one-hot
    rows out of `num_rows`), cols [B, T, C], float32. Packed (`seg`): B counts rows, each holding several
    samples; sample j's sum runs over its own token slots (`seg.n` samples)."""
    rows: torch.Tensor
    cols: torch.Tensor
    num_rows: int
    seg: Optional[Segments] = None

    @property
    def onehot(self) -> bool:
        return not self.rows.is_floating_point()

    @property
    def batch(self) -> int:
        """Samples (not rows)."""
        return self.seg.n if self.seg is not None else self.rows.shape[0]

    def samplewise(self, x: torch.Tensor) -> torch.Tensor:
        """[samples, tokens, ...] from a [B, T, ...] token tensor: each segment's tokens as its own row."""
        return x if self.seg is None else self.seg.unpack(x, self.seg.width())

    def per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """[samples, ...] sums over each sample's tokens of a [B, T, ...] per-token tensor."""
        return token_sum(x, self.seg)

    def materialise(self) -> torch.Tensor:
        rows, cols = self.samplewise(self.rows), self.samplewise(self.cols)
        B, T, C = cols.shape
        if not self.onehot:
            return rows.transpose(1, 2) @ cols
        out = torch.zeros(B * self.num_rows, C, dtype=cols.dtype, device=cols.device)
        offset = torch.arange(B, device=rows.device).unsqueeze(1) * self.num_rows
        out.index_add_(0, (rows + offset).flatten(), cols.flatten(0, 1))
        return out.view(B, self.num_rows, C)

    def ghost_cost(self) -> int:
        T = self.cols.shape[1]
        return T * T * (self.cols.shape[2] + (0 if self.onehot else self.num_rows))

    def materialise_cost(self) -> int:
        return self.cols.shape[1] * self.num_rows * self.cols.shape[2]

    def row_slice(self, v0: int, v1: int) -> torch.Tensor:
        """[B, T, v1 - v0] float32: rows' entries v0..v1 (one-hot rows made dense for that slice)."""
        if not self.onehot:
            return self.rows[..., v0:v1]
        inside = (self.rows >= v0) & (self.rows < v1)
        out = torch.zeros(*self.rows.shape, v1 - v0, dtype=self.cols.dtype, device=self.cols.device)
        out.scatter_(2, (self.rows - v0).clamp(0, v1 - v0 - 1).unsqueeze(2), inside.unsqueeze(2).to(out.dtype))
        return out

    def row_chunks(self):
        """(v0, v1, rows[..., v0:v1]) over the rows' entries: one piece (HeadFactor: vocabulary chunks)."""
        yield 0, self.num_rows, self.row_slice(0, self.num_rows)

    def project_rows(self, P: torch.Tensor) -> torch.Tensor:
        """[B, T, k] of P r_t for P [k, num_rows]."""
        return P.T[self.rows] if self.onehot else self.rows @ P.T

    def materialise_slice(self, v0: int, v1: int) -> torch.Tensor:
        """[B, v1 - v0, C]: rows v0..v1 of the per-sample matrix."""
        return self.row_slice(v0, v1).transpose(1, 2) @ self.cols


class HeadFactor(Factor):
    """The output head's weight on the lean path (`dataflex.core.lean_loss`): rows are the per-token
    gradients of the loss with respect to the logits, g_t = c_t (softmax(z_t) - onehot(y_t)) in R^V
    (c_t = dL/dl_t, the token's weight in the loss), cols the head's inputs h_t. The rows are never
    held for the whole vocabulary: `row_chunks` recomputes them from (h, W, b, y, lse) one vocabulary
    chunk at a time ([B, T, chunk], within `core.lean_loss.chunk_shape`'s budget), so norms, dots,
    projections and per-sample gradients of the head need no [B, T, V] tensor."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 labels: torch.Tensor, lse: torch.Tensor, scale: torch.Tensor, vocab_chunk: Optional[int] = None):
        B, T = hidden.shape[:2]
        self.hidden = hidden.detach()                      # the model's dtype: logits recomputed as the loss did
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.labels, self.lse, self.scale = labels, lse.float(), scale.float()
        env = os.environ.get("DATAFLEX_LEAN_CHUNK", "").partition("x")[2]   # the loss's override, ROWSxCOLS
        _, cols = chunk_shape(B * T, self.weight.shape[0], hidden.device, rows=B * T, cols=int(env) if env else None)
        self.vocab_chunk = vocab_chunk or cols
        super().__init__(torch.empty(B, T, 0, device=hidden.device), self.hidden.float(), self.weight.shape[0])

    @property
    def onehot(self) -> bool:
        return False

    def row_slice(self, v0: int, v1: int) -> torch.Tensor:
        B, T, H = self.hidden.shape
        z = self.hidden.reshape(B * T, H) @ self.weight[v0:v1].T
        if self.bias is not None:
            z = z + self.bias[v0:v1]
        g = (z.float() - self.lse.reshape(-1, 1)).exp_().view(B, T, v1 - v0)
        inside = (self.labels >= v0) & (self.labels < v1)
        g.scatter_add_(2, (self.labels - v0).clamp(0, v1 - v0 - 1).unsqueeze(2), -inside.unsqueeze(2).to(g.dtype))
        return g.mul_(self.scale.unsqueeze(2))

    def row_chunks(self):
        V = self.num_rows
        for v0 in range(0, V, self.vocab_chunk):
            v1 = min(V, v0 + self.vocab_chunk)
            yield v0, v1, self.row_slice(v0, v1)

    def project_rows(self, P: torch.Tensor) -> torch.Tensor:
        return sum(g @ P[:, v0:v1].T for v0, v1, g in self.row_chunks())

    def materialise(self) -> torch.Tensor:
        B, _, C = self.cols.shape
        out = torch.empty(B, self.num_rows, C, device=self.cols.device)
        for v0, v1, g in self.row_chunks():
            out[:, v0:v1] = g.transpose(1, 2) @ self.cols
        return out

    def bias_grad(self) -> torch.Tensor:
        """[B, V]: the per-sample gradient of the head's bias, sum_t g_t."""
        return torch.cat([g.sum(1) for _, _, g in self.row_chunks()], dim=1)


def row_gram(f: Factor, g: Factor) -> torch.Tensor:
    """[B, T, T'] of r_t . r'_s."""
    if isinstance(g, HeadFactor) and not isinstance(f, HeadFactor):
        return row_gram(g, f).transpose(1, 2)
    if isinstance(f, HeadFactor):                   # vocabulary chunk by chunk
        if f is g:
            return sum(r @ r.transpose(1, 2) for _, _, r in f.row_chunks())
        if g.onehot:                                # r_t[x_s]: gathered from the chunk holding x_s
            B, T = f.cols.shape[:2]
            out = torch.zeros(B, T, g.rows.shape[1], device=f.cols.device)
            for v0, v1, r in f.row_chunks():
                inside = ((g.rows >= v0) & (g.rows < v1)).unsqueeze(1)
                idx = (g.rows - v0).clamp(0, v1 - v0 - 1).unsqueeze(1).expand(B, T, g.rows.shape[1])
                out += r.gather(2, idx) * inside
            return out
        return sum(r @ g.row_slice(v0, v1).transpose(1, 2) for v0, v1, r in f.row_chunks())
    if not f.onehot and not g.onehot:
        return f.rows @ g.rows.transpose(1, 2)
    if f.onehot and g.onehot:
        return (f.rows.unsqueeze(2) == g.rows.unsqueeze(1)).to(f.cols.dtype)
    if f.onehot:
        return row_gram(g, f).transpose(1, 2)
    B, T, _ = f.rows.shape
    return f.rows.gather(2, g.rows.unsqueeze(1).expand(B, T, g.rows.shape[1]))


def token_sum(x: torch.Tensor, seg: Optional[Segments]) -> torch.Tensor:
    """[samples, ...]: a [B, T, ...] per-token tensor summed over each sample's tokens (its row when padded,
    its segment when packed)."""
    return x.sum(1) if seg is None else seg.sum(x)


def ghost_inner(f: Factor, g: Factor) -> torch.Tensor:
    """[samples] of <F_i, G_i> = sum_{t,s} (r_t . r'_s)(c_t . c'_s), t and s in sample i (packed: the row's
    T x T form masked to same-segment pairs)."""
    both = row_gram(f, g) * (f.cols @ g.cols.transpose(1, 2))
    if f.seg is None:
        return both.sum((1, 2))
    ids = f.seg.ids
    return f.seg.sum((both * (ids.unsqueeze(2) == ids.unsqueeze(1)).to(both.dtype)).sum(2))
