"""What a step leaves in the run's ledger and metrics: one row per sample the step drew (trained or, for a
selector, not kept: rank and row -1), with its step, rank, row, domain, weight and loss; and the token counts
(label tokens trained, the token slots they had, label tokens per domain)."""
from __future__ import annotations

from typing import Optional

import torch


def token_metrics(state, labels: torch.Tensor, token_slots: int) -> dict:
    """Label tokens trained this step (global), the token slots they had (rows x seq_len), the label tokens
    of each domain."""
    labels = labels.double()
    per_domain = torch.zeros(len(state.domains), dtype=torch.float64).index_add_(0, state.batch_domains, labels)
    return {"tokens": int(labels.sum()), "token_slots": int(token_slots),
            "domain_tokens": {d: int(per_domain[i]) for i, d in enumerate(state.domains)}}


def _not_kept(state, step: int) -> dict:
    """The candidates a selector did not keep: rank and row -1, weight 0, their probe loss when there was one."""
    dropped = ~state.keep_mask
    m = int(dropped.sum())
    loss = (state.candidate_losses.double()[dropped] if state.candidate_losses is not None
            else torch.full((m,), float("nan"), dtype=torch.float64))
    return {"step": [step] * m, "rank": [-1] * m, "row": [-1] * m,
            "sample_id": state.candidate_ids[dropped].tolist(),
            "domain": [state.domains[d] for d in state.candidate_domains[dropped].tolist()],
            "selected": [False] * m, "weight": [0.0] * m, "loss": loss.tolist()}


def packed_ledger_rows(state, step: int, weights: Optional[torch.Tensor], rows: torch.Tensor, rows_per_rank: int) -> dict:
    """Packed rows: one ledger row per sample trained this step (its global row and rank), then the candidates
    a selector did not keep. Kept samples that wait for a later step's rows are written at that step."""
    n = len(state.batch_ids)
    weights = weights if weights is not None else torch.ones(n, dtype=torch.float64)
    loss = torch.where(state.loss_finite, state.losses.double(), float("nan"))
    out = {"step": [step] * n, "rank": (rows // rows_per_rank).tolist(), "row": rows.tolist(),
           "sample_id": state.batch_ids.tolist(), "domain": [state.domains[d] for d in state.batch_domains.tolist()],
           "selected": [True] * n, "weight": weights.double().tolist(), "loss": loss.tolist()}
    if state.keep_mask is not None:
        for key, vals in _not_kept(state, step).items():
            out[key] = out[key] + vals
    return out


def ledger_rows(state, step: int, weights: Optional[torch.Tensor], global_batch_size: int, world_size: int) -> dict:
    """Padded rows: one ledger row per candidate in draw order, the kept ones with their rank and row."""
    B, per_rank = global_batch_size, global_batch_size // world_size
    kept = state.keep_mask if state.keep_mask is not None else torch.ones(len(state.candidate_ids), dtype=torch.bool)
    weights = weights if weights is not None else torch.ones(B, dtype=torch.float64)
    loss = torch.full((len(kept),), float("nan"), dtype=torch.float64)
    if state.candidate_losses is not None:
        loss[:] = state.candidate_losses.double()
    loss[kept] = torch.where(state.loss_finite, state.losses.double(), float("nan"))
    weight = torch.zeros(len(kept), dtype=torch.float64)
    weight[kept] = weights.double()
    rank = torch.full((len(kept),), -1, dtype=torch.long)
    rank[kept] = torch.arange(B) // per_rank
    row = torch.full((len(kept),), -1, dtype=torch.long)
    row[kept] = torch.arange(B)
    return {"step": [step] * len(kept), "rank": rank.tolist(), "row": row.tolist(),
            "sample_id": state.candidate_ids.tolist(),
            "domain": [state.domains[d] for d in state.candidate_domains.tolist()], "selected": kept.tolist(),
            "weight": weight.tolist(), "loss": loss.tolist()}
