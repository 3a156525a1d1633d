"""A tiny GPT-style causal LM that trains on two CPU cores in minutes.

Attention is written from Linear layers and position ids are batched ([B, T]) so that opacus's
per-sample gradient hooks, torch.func and a per-sample loop all agree on it. Optional LoRA adapters
on the attention projections give a realistic parameter subset for LESS-style gradients.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataflex.core.lean_loss import LeanOutput
from dataflex.core.packing import block_causal_mask


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) B A x, with W frozen when adapters are trained alone."""

    def __init__(self, d_in: int, d_out: int, rank: int = 0, alpha: float = 16.0):
        super().__init__()
        self.base = nn.Linear(d_in, d_out)
        self.rank = rank
        if rank > 0:
            self.lora_A = nn.Linear(d_in, rank, bias=False)
            self.lora_B = nn.Linear(rank, d_out, bias=False)
            nn.init.zeros_(self.lora_B.weight)
            self.scale = alpha / rank

    def forward(self, x):
        y = self.base(x)
        if self.rank > 0:
            y = y + self.lora_B(self.lora_A(x)) * self.scale
        return y


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, lora_rank: int = 0):
        super().__init__()
        self.n_heads = n_heads
        self.q = LoRALinear(d_model, d_model, lora_rank)
        self.k = LoRALinear(d_model, d_model, lora_rank)
        self.v = LoRALinear(d_model, d_model, lora_rank)
        self.o = LoRALinear(d_model, d_model, lora_rank)

    def forward(self, x, mask=None):
        """`mask` [B, 1, T, T] bool (True = attend; causal within each packed sample); None: causal."""
        B, T, C = x.shape
        h = self.n_heads

        def split(t):
            return t.view(B, T, h, C // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        if mask is None:
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        if _under_functorch(x):        # torch.func has no batching rule for SDPA's CPU kernels
            att = (q @ k.transpose(-2, -1)) / math.sqrt(C // h)
            y = att.masked_fill(~mask, float("-inf")).softmax(dim=-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


def _under_functorch(t: torch.Tensor) -> bool:
    try:
        return torch._C._functorch.is_functorch_wrapped_tensor(t)
    except AttributeError:  # pragma: no cover - older torch
        return False


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, lora_rank: int = 0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, lora_rank)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask)
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab_size: int = 2048, seq_len: int = 128, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, lora_rank: int = 0, seed: int = 0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by model.n_heads={n_heads}")
        torch.manual_seed(seed)
        self.seq_len = seq_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, lora_rank) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, input_ids, position_ids=None, lean: bool = False):
        """Logits [B, T, V]. Attention is causal and never crosses a restart of `position_ids` (packed rows
        hold several samples, each counting from 0: `dataflex.core.packing`). `lean=True`: the last hidden states and the head instead
        (`dataflex.core.lean_loss.LeanOutput`), for the loss without logits."""
        B, T = input_ids.shape
        mask = None
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        else:       # packed rows: attention stays inside each sample (a new one wherever positions restart)
            mask = block_causal_mask(position_ids)
        x = self.tok_emb(input_ids) + self.pos_emb(position_ids)
        for block in self.blocks:
            x = block(x, mask)
        if lean:
            return LeanOutput(self.ln_f(x), self.head)
        return self.head(self.ln_f(x))
