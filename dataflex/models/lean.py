"""The lean forward: a model's last hidden states and its output head instead of its logits, where it offers them."""
from __future__ import annotations

from typing import Optional

import torch

from dataflex.core.lean_loss import LeanOutput, usable_head
from dataflex.models.hf import hf_forward, is_hf_model


def lean_forward(forward, call, batch: dict) -> Optional[LeanOutput]:
    """The training forward's `LeanOutput` (hidden states and head) where the model offers one:
    HF and peft causal LMs (`dataflex.models.hf.hf_forward(lean=True)`) and modules whose forward takes
    `lean=` (TinyGPT); None otherwise (the caller takes the logits path). Under DeepSpeed ZeRO-3
    the head's weight is a partition outside the engine's forward: the chunked loss calls it through its
    module, whose ZeRO hooks gather it (`dataflex.core.lean_loss.linear_cross_entropy`)."""
    module = call
    while hasattr(module, "module") and isinstance(getattr(module, "module"), torch.nn.Module):
        module = module.module
    if is_hf_model(module):
        keywords = dict(getattr(forward, "keywords", None) or {})
        keywords.pop("lean", None)
        return hf_forward(call, batch, lean=True, **keywords)
    import inspect
    if "lean" in inspect.signature(module.forward).parameters:
        return call(batch["input_ids"], position_ids=batch.get("position_ids"), lean=True)
    return None


def offers_lean(module) -> bool:
    """Whether `lean_forward` can give this model's hidden states and head (without running it): an HF or
    peft causal LM with `logits_to_keep` and a plain linear head, or a module whose forward takes `lean=`."""
    import inspect

    while hasattr(module, "module") and isinstance(getattr(module, "module"), torch.nn.Module):
        module = module.module
    if is_hf_model(module):
        base = module.get_base_model() if hasattr(module, "get_base_model") else module
        head = base.get_output_embeddings()
        if head is None or "logits_to_keep" not in inspect.signature(base.forward).parameters:
            return False
        return usable_head(head)
    return "lean" in inspect.signature(module.forward).parameters
