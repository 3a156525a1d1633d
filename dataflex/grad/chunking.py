"""A batch in chunks of rows for the gradient engine, and the chunks' per-sample results back in sample order.

A padded batch's samples are its rows; a packed batch's (`segment_ids`) are the samples with token slots in the
chunk's rows, renumbered from 0 inside the chunk, so every engine path computes per chunk and `assemble` puts
each sample's result back in the batch's `sample_id` order.
"""
from __future__ import annotations

from typing import Optional

import torch

ROW_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "attention_mask", "segment_ids")


def chunks(batch: dict, chunk_size: Optional[int]):
    """(part, samples): `chunk_size` rows at a time, and the indices of the batch's samples the part holds
    (a padded batch: its rows; a packed one: the samples with token slots in those rows, renumbered from 0)."""
    n = batch["input_ids"].shape[0]
    size = n if not chunk_size else chunk_size
    packed = "segment_ids" in batch
    if packed and size >= n:
        yield batch, torch.arange(len(batch["sample_id"]), device=batch["input_ids"].device)
        return
    for start in range(0, n, size):
        part = {k: batch[k][start:start + size] for k in ROW_KEYS if k in batch}
        if not packed:
            yield part, torch.arange(start, min(n, start + size), device=batch["input_ids"].device)
            continue
        seg = part["segment_ids"]
        samples = torch.unique(seg[seg >= 0])                       # sorted
        part["segment_ids"] = torch.where(seg >= 0, torch.searchsorted(samples, seg.clamp(min=0)), seg)
        part["sample_id"] = batch["sample_id"][samples.to(batch["sample_id"].device)]
        yield part, samples


def assemble(results: list, indices: list, n: int) -> torch.Tensor:
    """The chunks' per-sample results [k, ...] in the batch's sample order ([n, ...]; zeros for a sample no
    chunk holds: a packed sample without token slots, whose gradient is zero)."""
    if len(results) == 1 and len(indices[0]) == n:
        return results[0]
    first = results[0]
    out = torch.zeros((n, *first.shape[1:]), dtype=first.dtype, device=first.device)
    return out.index_copy(0, torch.cat(indices).to(first.device), torch.cat(results))


def batch_samples(batch: dict) -> int:
    return len(batch["sample_id"]) if "segment_ids" in batch else batch["input_ids"].shape[0]
