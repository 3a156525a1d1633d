"""Per-token loss -> per-sample loss -> per-sample weights -> the scalar to backpropagate.

A batch is a dict of tensors: `input_ids`, `labels` and `loss_mask` ([B, T], labels aligned with
inputs, mask 1 on label tokens and 0 on padding or prompt tokens), `position_ids` ([B, T]), and
`sample_id`, `domain` ([B]).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def per_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position, [B, T]."""
    B, T, V = logits.shape
    return F.cross_entropy(logits.reshape(B * T, V).float(), labels.reshape(B * T), reduction="none").view(B, T)


def per_sample_from_token_loss(token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's label tokens; a sample with no label token has loss 0."""
    mask = loss_mask.to(token_loss.dtype)
    return (token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return per_sample_from_token_loss(per_token_loss(logits, labels), loss_mask)


def weighted_mean(per_sample: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """mean_i(w_i * l_i). Weights have mean 1 over the global batch, so all-ones is the plain mean."""
    if weights is None:
        return per_sample.mean()
    return (weights.to(per_sample.dtype) * per_sample).mean()


class LossWrapper:
    """Turns model outputs into the training scalar and records the per-sample signal.

    `weigh(per_sample_loss, batch) -> weights` is where a run's reweighters come in (the DataFlex
    session gathers losses across ranks there); without it every sample weighs 1. After each call
    `last` holds the detached per-sample losses, ids, domains and weights of the local batch.
    """

    def __init__(self, weigh: Optional[Callable[[torch.Tensor, dict], Optional[torch.Tensor]]] = None):
        self.weigh = weigh
        self.last: dict = {}

    def __call__(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.from_token_loss(per_token_loss(logits, batch["labels"]), batch)

    def from_token_loss(self, token_loss: torch.Tensor, batch: dict) -> torch.Tensor:
        """Entry point for Megatron-core's `loss_func`, whose output tensor is the per-token loss."""
        per_sample = per_sample_from_token_loss(token_loss, batch["loss_mask"])
        weights = self.weigh(per_sample.detach(), batch) if self.weigh else None
        self.last = {
            "loss": per_sample.detach(),
            "sample_id": batch.get("sample_id"),
            "domain": batch.get("domain"),
            "weight": weights,
        }
        return weighted_mean(per_sample, weights)
