"""Packed rows: several samples back to back in each row of `seq_len` token slots.

A packed batch holds `input_ids`, `labels`, `loss_mask` and `position_ids` as [R, T] rows, plus
`segment_ids` [R, T] (the local sample each token slot belongs to, -1 on slots no sample fills),
`sample_id` and `domain` [S] (one per sample, in row order) and `row` [S] (each sample's global row).
`position_ids` restart at 0 at every sample, so a sample's token p sits at position p exactly as in
its padded row: models keep attention inside a sample from `segment_ids` or from the position ids
(a new sample starts wherever the position does not advance by 1, transformers' packed convention).

The step's plan (`plan_rows`) is a deterministic best-fit decreasing: samples left over from the previous
step first, then fresh draws gathered to cover the free slots, each group longest first, each sample into
the fullest row that still holds it; a sample that fits no row waits for the next step (`carry`, kept in
the sampler's state), never dropped. Drawing stops when every slot is filled, `lookahead` samples are
waiting, or what waits fills half of the step's slots (so the next step surely places it).

`Segments` maps between the packed rows and the per-sample layout ([S, T], a sample's token p at
column p, what a padded batch holds): per-sample sums, unpacking, packing and spreading a per-sample
value over its tokens, all differentiable where the values are.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch


def best_fit(lengths: Sequence[int], free: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, offset) of each sample, in the order given, placed into the row with the least room that still
    holds it (the first such row on ties; (-1, -1) where none has); `free` [R] (slots left in each row) is
    updated in place."""
    rows = np.full(len(lengths), -1, dtype=np.int64)
    offsets = np.full(len(lengths), -1, dtype=np.int64)
    for i, n in enumerate(lengths):
        fits = np.flatnonzero(free >= n)
        if len(fits):
            r = int(fits[np.argmin(free[fits])])
            rows[i], offsets[i] = r, seq_len - free[r]
            free[r] -= n
    return rows, offsets


class Plan:
    """One step's packing: samples in row order with their row and offset, and those left waiting."""

    def __init__(self, ids, lengths, rows, offsets, carry, n_rows: int, seq_len: int):
        order = np.lexsort((offsets, rows))
        self.ids = torch.as_tensor(np.asarray(ids, dtype=np.int64)[order])
        self.lengths = torch.as_tensor(np.asarray(lengths, dtype=np.int64)[order])
        self.rows = torch.as_tensor(np.asarray(rows, dtype=np.int64)[order])
        self.offsets = torch.as_tensor(np.asarray(offsets, dtype=np.int64)[order])
        self.carry = [int(i) for i in carry]
        self.n_rows, self.seq_len = int(n_rows), int(seq_len)

    def rank_bounds(self, rank: int, world_size: int) -> tuple[int, int, int, int]:
        """(first row, end row, first sample, end sample) of a rank's contiguous share of the rows."""
        per = self.n_rows // world_size
        r0, r1 = rank * per, (rank + 1) * per
        s0 = int(torch.searchsorted(self.rows, torch.tensor(r0)))
        s1 = int(torch.searchsorted(self.rows, torch.tensor(r1)))
        return r0, r1, s0, s1

    def slots_used(self) -> int:
        return int(self.lengths.sum())


def plan_rows(pending: Sequence[int], draw: Optional[Callable[[int], torch.Tensor]], lengths: Callable, n_rows: int,
              seq_len: int, lookahead: int = 16, first_guess: Optional[float] = None) -> Plan:
    """Best-fit decreasing of `pending` (carried from the last step), then of fresh `draw(n)` ids, into `n_rows`
    rows of `seq_len` slots. `lengths(ids)` gives each sample's slots (its label tokens). Deterministic given the
    same pending ids and draws; nothing is dropped: a sample that fits no row is carried to the next step.

    Each group is placed longest first (draw order on ties), each sample into the fullest row that still holds
    it: first the pending samples, then fresh draws gathered until they cover the free slots and half of what
    may still wait, drawn in chunks of at most a sample a row (one a row while no length is known, or sized
    from `first_guess`; then from the mean length drawn), so a wrong guess overshoots by one chunk at most.
    Drawing stops when every slot is filled, `lookahead` samples wait, or the waiting samples fill half of the
    step's slots: the next step places its pending samples first, and longest-first placement never fails
    while what is placed fits in half the slots of empty rows (a sample that fits no row finds every row more
    than half full), so a carried sample trains about one step later. `draw=None`: place `pending` only."""
    free = np.full(n_rows, seq_len, dtype=np.int64)
    ids_all, len_all, row_all, off_all, carry = [], [], [], [], []
    carried = [0]                                           # slots of the samples that fit no row
    budget = n_rows * seq_len // 2

    def place(ids, lens=None):
        ids = np.asarray(ids, dtype=np.int64)
        if not len(ids):
            return
        lens = np.asarray(lengths(ids) if lens is None else lens, dtype=np.int64)
        if (lens > seq_len).any() or (lens < 0).any():
            raise ValueError(f"sample lengths must lie in [0, {seq_len}], got {lens.max()}")
        order = np.argsort(-lens, kind="stable")            # longest first, draw order on ties
        rows = np.full(len(ids), -1, dtype=np.int64)
        offs = np.full(len(ids), -1, dtype=np.int64)
        rows[order], offs[order] = best_fit(lens[order].tolist(), free, seq_len)
        ok = rows >= 0
        ids_all.append(ids[ok]), len_all.append(lens[ok]), row_all.append(rows[ok]), off_all.append(offs[ok])
        carry.extend(ids[~ok].tolist())                     # in the order given
        carried[0] += int(lens[~ok].sum())

    seen_tokens, seen_samples = 0, 0                        # label tokens and samples drawn so far
    place(pending)
    while draw is not None and free.sum() > 0 and len(carry) < lookahead and carried[0] < budget:
        target = free.sum() + (budget - carried[0]) // 2    # slots to gather, then placed together
        got, got_lens, total = [], [], 0
        while total < target:
            if seen_samples:    # chunks of at most a sample a row, sized from the mean length seen
                mean = max(seen_tokens / seen_samples, 1.0)
                n = int(min(n_rows, max(1, math.ceil((target - total) / mean))))
            else:
                n = n_rows if not first_guess else int(min(n_rows, max(1, math.ceil(target / first_guess))))
            ids = draw(n).numpy()
            lens = np.asarray(lengths(ids), dtype=np.int64)
            got.append(ids), got_lens.append(lens)
            seen_tokens, seen_samples = seen_tokens + int(lens.sum()), seen_samples + len(lens)
            total += int(lens.sum()) if len(ids) else target
        place(np.concatenate(got), np.concatenate(got_lens))
    cat = (lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64))
    return Plan(cat(ids_all), cat(len_all), cat(row_all), cat(off_all), carry, n_rows, seq_len)


def segments_from_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[.., T] segment numbers: a new segment wherever the position does not advance by 1 (transformers'
    packed convention). Tensor ops only, so it works under vmap."""
    first = position_ids[..., :1] - 1
    return (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)


def block_causal_mask(position_ids: torch.Tensor, segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, 1, T, T] bool (True = attend): causal and within one sample. Samples from `segment_ids` when
    given, else from the position ids."""
    seg = segment_ids if segment_ids is not None else segments_from_positions(position_ids)
    T = seg.shape[-1]
    keep = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    keep = keep & torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
    return keep.unsqueeze(-3)


class Segments:
    """Index maps of a packed batch between [R, T] token slots and the per-sample [S, T] layout."""

    def __init__(self, segment_ids: torch.Tensor, position_ids: torch.Tensor, n: int):
        self.ids = segment_ids
        self.valid = segment_ids >= 0
        self.seg = segment_ids[self.valid]
        self.pos = position_ids[self.valid]
        self.n, self.shape = int(n), tuple(segment_ids.shape)
        T = self.shape[-1]
        self._flat = (segment_ids.clamp(min=0) * T + position_ids.clamp(min=0, max=T - 1))

    @classmethod
    def of(cls, batch: dict) -> Optional["Segments"]:
        """The batch's segments when it is packed (holds `segment_ids`), else None."""
        if "segment_ids" not in batch:
            return None
        return cls(batch["segment_ids"], batch["position_ids"], len(batch["sample_id"]))

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """[S, ...] per-sample sums of a [R, T, ...] tensor."""
        out = torch.zeros((self.n, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return out.index_add(0, self.seg, x[self.valid])

    def width(self) -> int:
        """Slots of the longest sample (0 without any)."""
        return int(self.pos.max()) + 1 if self.pos.numel() else 0

    def unpack(self, x: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
        """[S, T, ...] from [R, T, ...]: each sample's token p at column p (0 beyond the sample), as its
        padded row holds it; `width` keeps the first columns only (at least `width()`)."""
        out = torch.zeros((self.n, self.shape[-1] if width is None else width, *x.shape[2:]), dtype=x.dtype,
                          device=x.device)
        return out.index_put((self.seg, self.pos), x[self.valid])

    def pack(self, y: torch.Tensor) -> torch.Tensor:
        """[R, T] from a per-sample [S, T] tensor (0 on empty slots)."""
        if self.n == 0:
            return torch.zeros(self.shape, dtype=y.dtype, device=y.device)
        return y.reshape(-1)[self._flat] * self.valid.to(y.dtype)

    def spread(self, v: torch.Tensor) -> torch.Tensor:
        """[R, T]: each sample's value on each of its token slots (0 on empty slots)."""
        if self.n == 0:
            return torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        return v[self._flat // self.shape[-1]] * self.valid.to(v.dtype)


ROW_KEYS = ("input_ids", "labels", "loss_mask", "position_ids", "segment_ids")


def slice_rows(batch: dict, r0: int, r1: int) -> dict:
    """Rows [r0, r1) of a batch (a micro-batch): a padded batch's rows; a packed batch's rows with the samples
    they hold (per-sample keys cut to them, `segment_ids` renumbered from 0). Samples lie in row order."""
    if "segment_ids" not in batch:
        return {k: v[r0:r1] for k, v in batch.items()}
    seg = batch["segment_ids"]
    n = len(batch["sample_id"])
    row_of = torch.full((n,), -1, dtype=torch.long, device=seg.device)
    rows = torch.arange(seg.shape[0], device=seg.device).unsqueeze(1).expand_as(seg)
    row_of[seg[seg >= 0]] = rows[seg >= 0]
    if n:                                   # a sample without token slots goes with the one before it
        row_of = row_of.cummax(0).values.clamp(min=0)
    s0 = int(torch.searchsorted(row_of, torch.tensor(r0, device=seg.device)))
    s1 = int(torch.searchsorted(row_of, torch.tensor(r1, device=seg.device)))
    out = {k: (v[r0:r1] if k in ROW_KEYS else v[s0:s1]) for k, v in batch.items()}
    part = out["segment_ids"]
    out["segment_ids"] = torch.where(part >= 0, part - s0, part)
    return out
