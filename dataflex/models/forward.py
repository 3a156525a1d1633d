"""The calling convention of a causal LM in dataflex: `forward(call, batch) -> logits`; the batch keys a sample has."""
from __future__ import annotations

from typing import Callable

import torch

SAMPLE_KEYS = ("input_ids", "labels", "loss_mask", "position_ids")


def default_forward(call: Callable, batch: dict) -> torch.Tensor:
    """Run a causal LM on a batch and return logits (HF-style outputs with `.logits` work too)."""
    out = call(batch["input_ids"], position_ids=batch["position_ids"])
    return getattr(out, "logits", out)


