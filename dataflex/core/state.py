"""The small data state that plugins read and write (never the loop itself)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch


@dataclass
class DataState:
    domains: list[str]
    domain_sizes: list[int]
    global_batch_size: int
    world_size: int = 1
    step: int = 0
    domain_weights: Optional[torch.Tensor] = None      # [K], float64, sums to 1, in `weight_unit`
    weight_unit: str = "sample"                        # "token" | "sample": what domain_weights are shares of
    packing: bool = False                              # packed rows (the default mixer unit is then token)
    domain_mean_tokens: Optional[torch.Tensor] = None  # [K] mean label tokens of a sample of each domain's pool
    draw_probabilities: Optional[torch.Tensor] = None  # [K] the sampler's per-sample domain probabilities
    candidate_ids: Optional[torch.Tensor] = None       # [C] global sample ids drawn this step
    candidate_domains: Optional[torch.Tensor] = None   # [C]
    keep_mask: Optional[torch.Tensor] = None           # [C] bool, set by a selector
    pool_masks: dict = field(default_factory=dict)     # {domain index: [N_d] bool | None}: restrict
                                                       # the sampler from the next draw on (LESS-style)
    candidate_losses: Optional[torch.Tensor] = None    # [C] probe losses, when a selector asked
    batch_ids: Optional[torch.Tensor] = None           # [B] the global batch trained on
    batch_domains: Optional[torch.Tensor] = None       # [B]
    batch_rows: Optional[torch.Tensor] = None          # [B] packed layout: each sample's global row (else None)
    losses: Optional[torch.Tensor] = None              # [B] per-sample training losses, all ranks
                                                       # (a non-finite one reads as the finite mean)
    loss_finite: Optional[torch.Tensor] = None         # [B] bool: False where the loss was NaN/inf
    sample_weights: Optional[torch.Tensor] = None      # [B] mean 1, set by a reweighter
    token_losses: Optional[torch.Tensor] = None        # [B, T] per-token losses, all ranks (only
                                                       # gathered when a plugin sets needs_token_losses)
    token_mask: Optional[torch.Tensor] = None          # [B, T] float, 1 on label tokens
    token_weights: Optional[torch.Tensor] = None       # [B, T] >= 0, set by a token-level reweighter
    domain_loss_weights: Optional[torch.Tensor] = None # [K] a mixer with apply=loss: each sample's
                                                       # loss is scaled by w_d / q_d (q = sampling dist.)
    val_loss: dict = field(default_factory=dict)       # {domain: float}, after an evaluation
    signals: Any = None                                # dataflex.session.flex.Signals: probe, grads
    metrics: dict = field(default_factory=dict)        # plugin statistics for this step's log

    @property
    def num_domains(self) -> int:
        return len(self.domains)

    def domain_mean(self, values: torch.Tensor, domains: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return per_domain_mean(values, domains, self.num_domains)


def keep_pool(state, keep: torch.Tensor) -> list:
    """Restrict every domain's pool to `keep` (a mask over the whole pool, domains in order) through the
    sampler's pool masks; returns how many each domain keeps."""
    counts = []
    for d, part in enumerate(torch.split(keep, list(state.domain_sizes))):
        state.pool_masks[d] = part.clone()
        counts.append(int(part.sum()))
    return counts


def per_domain_mean(values: torch.Tensor, domains: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-domain mean of `values` (0 where absent) and a mask of the domains present."""
    sums = torch.zeros(K, dtype=torch.float64).index_add_(0, domains, values.double())
    counts = torch.zeros(K, dtype=torch.float64).index_add_(0, domains, torch.ones_like(values, dtype=torch.float64))
    present = counts > 0
    return torch.where(present, sums / counts.clamp(min=1), torch.zeros_like(sums)), present
