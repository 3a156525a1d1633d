"""Exact per-sample gradients with torch.func (vmap over grad of a one-sample loss).

Parameters are chosen by name: "all", "lora" (LoRA adapters), a regular expression, or a list of
them. vmap runs over chunks of samples, bounding its activation memory; with a projector, the B x P
gradients are projected in one pass (the random matrix is the expensive part) and dropped. Norms
are exact: the L2 norm of each sample's full gradient over the chosen parameters.

Projectors: `RademacherProjector` (dense, the reference) projects the whole batch at once;
`SparseProjector` takes exact per-sample gradients from the hook engine of `dataflex.grad.ghost`, one
parameter at a time (`engine="vmap"`: from vmap, chunk by chunk), so memory stays bounded;
`FactoredProjector` never materialises a per-sample gradient (`dataflex.grad.factored`: one forward
and one backward of the batch).

Packed batches (several samples a row) give one result per sample, computed per segment: the hook engine
on the packed rows (`dataflex.grad.ghost`), the exact paths on each sample's own row (`sample_rows`).

Randomness: by default the module runs in eval mode for the call (dropout off: the same numbers
for every chunking and every path). `train_mode=True` keeps the module's mode; vmap then draws
each sample's own dropout mask (`randomness="different"`), as a batched step would, but not the
same masks as any other call.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from dataflex.core.packing import Segments

ParamSpec = Union[str, Sequence[str]]


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module, enable: bool = True):
    """The module in eval mode (dropout off) for the block, its own mode restored after."""
    was = [(m, m.training) for m in module.modules()]
    if enable:
        module.eval()
    try:
        yield module
    finally:
        for m, training in was:
            m.training = training


def select_params(module: torch.nn.Module, params: ParamSpec = "all") -> dict:
    patterns = [params] if isinstance(params, str) else list(params)
    named = dict(module.named_parameters())
    if patterns == ["all"]:
        chosen = named
    elif patterns == ["trainable"]:                  # what requires grad (a peft model's adapters)
        chosen = {n: p for n, p in named.items() if p.requires_grad}
    else:
        regexes = [re.compile(r"lora_" if p == "lora" else p) for p in patterns]
        chosen = {n: p for n, p in named.items() if any(r.search(n) for r in regexes)}
    if not chosen and patterns == ["trainable"] and named:
        raise ValueError(frozen_message(module))
    if not chosen:
        raise ValueError(f"no parameter matches {patterns!r}; parameters look like: {list(named)[:6]}")
    return chosen


def frozen_message(module: torch.nn.Module) -> str:
    """What to say when nothing requires grad: a peft adapter reloaded with `PeftModel.from_pretrained`
    is frozen (inference mode) unless it was loaded with `is_trainable=True`."""
    if hasattr(module, "peft_config"):
        return ("no parameter requires grad: this peft model's adapters are frozen (PeftModel.from_pretrained "
                "loads them for inference). To train them, load with PeftModel.from_pretrained(base, path, "
                "is_trainable=True); to score them without training, pass params=\"lora\" (the adapters by "
                "name, frozen or not)")
    return ("no parameter requires grad (every parameter is frozen): unfreeze what should train, or name the "
            "parameters to score (params=\"all\", \"lora\", a regular expression)")


@dataclass
class PerSampleGrads:
    norms: torch.Tensor                              # [B]
    grads: Optional[dict] = None                     # name -> [B, *param.shape], unless projected
    projected: Optional[torch.Tensor] = None         # [B, d]
    projector: Optional[dict] = None                 # projector.describe() (+ "layout" for factored)

    def flat(self) -> torch.Tensor:
        return torch.cat([g.flatten(1) for g in self.grads.values()], dim=1)

    def save(self, path, sample_ids: torch.Tensor, **meta) -> None:
        """Store projected features with the projector and seed that made them: features from
        different projectors or seeds live in different spaces and must never be compared."""
        if self.projected is None:
            raise ValueError("only projected gradients are stored; pass a projector")
        torch.save({"features": self.projected, "norms": self.norms, "sample_ids": torch.as_tensor(sample_ids),
                    "projector": self.projector, **meta}, path)

    @staticmethod
    def load(path) -> dict:
        """What `save` wrote (tensors, the projector's description: plain containers), read weights-only."""
        from dataflex.utils.safeload import load_weights_only

        return load_weights_only(path, "per-sample gradient features")


def refuse_packed(batch: dict, what: str) -> None:
    """Probes run on padded batches (one sample a row: `Signals` builds them from sample ids); gradient
    signals take packed ones too (per segment)."""
    if "segment_ids" in batch:
        raise ValueError(f"{what}: this batch is packed (several samples a row); probes run on padded batches, one "
                         "sample a row: pass MixtureDataset.batch(sample_ids) (what state.signals does), not the "
                         "packed training batch")


def sample_rows(batch: dict) -> dict:
    """One sample a row: a padded batch as it is; a packed one (`segment_ids`, dataflex.core.packing) with each
    sample's token slots as its own row, token p at column p and positions 0, 1, ..., as its padded row
    holds them, cut to the longest sample. Attention never crosses samples in a packed row and positions
    restart at each, so a sample's loss, and its gradient, are the same in both layouts: the exact
    per-sample paths (torch.func's vmap, the loop) run each sample on its own row of L <= T columns
    rather than each on a whole packed row."""
    if "segment_ids" not in batch:
        return batch
    seg = Segments.of(batch)
    width = max(seg.width(), 1)
    out = {k: seg.unpack(batch[k], width) for k in ("input_ids", "labels", "loss_mask")}
    out["position_ids"] = torch.arange(width, device=batch["input_ids"].device).expand(seg.n, width).contiguous()
    out.update({k: batch[k] for k in ("sample_id", "domain") if k in batch})
    return out
