"""The training mixture: every domain's samples behind one id space (domain by domain, in order).

`DomainIndex` maps global sample ids to domains; `MixtureDataset` reads any id's row on demand from
its domain's set (memory-mapped shards or an in-memory `SampleSet`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from dataflex.data.shards import _RowView


class DomainIndex:
    """`mixture.domain`: the domain of global sample ids from the cumulative sizes, without an [N] tensor.

    `domain[ids]` bucketizes the ids; used whole (`domain == k`, `per_domain_mean(x, domain, K)`,
    `offsets[domain]`) it becomes the full tensor, built once on first such use (small sets: validation)."""

    def __init__(self, sizes: list):
        self.sizes = list(sizes)
        self.bounds = torch.tensor(np.cumsum(self.sizes)[:-1].tolist(), dtype=torch.long)
        self._full: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return int(sum(self.sizes))

    def __getitem__(self, ids) -> torch.Tensor:
        if isinstance(ids, slice):
            ids = torch.arange(len(self))[ids]
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"sample ids out of range [0, {len(self)})")
        return torch.bucketize(ids, self.bounds, right=True)

    def tensor(self) -> torch.Tensor:
        if self._full is None:
            self._full = torch.repeat_interleave(torch.arange(len(self.sizes)), torch.tensor(self.sizes))
        return self._full

    def __eq__(self, other):
        return self.tensor() == other

    def __iter__(self):
        return iter(self.tensor())

    def tolist(self) -> list:
        return self.tensor().tolist()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def conv(a):
            if isinstance(a, DomainIndex):
                return a.tensor()
            return type(a)(conv(x) for x in a) if isinstance(a, (list, tuple)) else a
        return func(*conv(args), **{k: conv(v) for k, v in (kwargs or {}).items()})


def check_domain(name, s) -> None:
    """A domain is samples (`SampleSet`, `ShardSampleSet`): a Hugging Face dataset given as one is refused
    with what to do (dataflex draws samples by id, at a fixed seq_len, so a stream cannot be a domain)."""
    if hasattr(s, "rows") and hasattr(s, "seq_len"):
        return
    from dataflex.utils.errors import DataConfigError

    kind = type(s).__name__
    if type(s).__module__.split(".")[0] == "datasets":
        if "Iterable" in kind:
            raise DataConfigError(f"domain {name!r}: a streaming dataset ({kind}) cannot be a domain: dataflex draws "
                                  "samples by id, in any order, and resumes at an exact position. Load it with "
                                  "`load_dataset(..., streaming=False)` (or save it: `Dataset.from_generator(lambda: "
                                  "iter(stream)).save_to_disk(DIR)`), then make it a domain with "
                                  "dataflex.data.domains.dataset_domain(ds, seq_len, tokenizer)")
        raise DataConfigError(f"domain {name!r}: a {kind} is not samples yet: make it a domain with "
                              "dataflex.data.domains.dataset_domain(ds, seq_len, tokenizer) (text, tokenized or "
                              "prompt/completion records), or name its saved folder in a data config")
    raise DataConfigError(f"domain {name!r}: expected samples (dataflex.load_domains(...).train[NAME], a SampleSet), "
                          f"got {kind}")


class MixtureDataset:
    """All domains' samples behind one id space: global id = domain offset + index within the domain.
    Rows are read on demand from each domain's set (memory-mapped shards or in-memory `SampleSet`s)."""

    def __init__(self, sets: dict):
        for name, s in sets.items():
            check_domain(name, s)
        self.names = list(sets)
        self.sets = list(sets.values())
        self.sizes = [len(s) for s in self.sets]
        self.offsets = [0] + np.cumsum(self.sizes).tolist()
        self.seq_len = self.sets[0].seq_len if self.sets else 0
        self.domain = DomainIndex(self.sizes)
        self.input_ids, self.labels, self.loss_mask = (_RowView(self, i) for i in range(3))

    def __len__(self) -> int:
        return self.offsets[-1]

    def domain_of(self, ids) -> torch.Tensor:
        return self.domain[ids]

    def locate(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(domain, index within the domain) of global ids."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        d = self.domain[ids]
        return d, ids - torch.tensor(self.offsets, dtype=torch.long)[d]

    def rows(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d, local = self.locate(torch.atleast_1d(torch.as_tensor(ids, dtype=torch.long)))
        B, T = len(d), self.seq_len
        out = (torch.empty(B, T, dtype=torch.long), torch.empty(B, T, dtype=torch.long),
               torch.empty(B, T, dtype=torch.bool))
        for k in torch.unique(d).tolist():
            where = d == k
            for dst, src in zip(out, self.sets[k].rows(local[where])):
                dst[where] = src
        return out

    def batch(self, ids: torch.Tensor) -> dict:
        ids = torch.as_tensor(ids, dtype=torch.long)
        B, T = len(ids), self.seq_len
        input_ids, labels, loss_mask = self.rows(ids)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "loss_mask": loss_mask.float(),
            "position_ids": torch.arange(T).expand(B, T).contiguous(),
            "sample_id": ids,
            "domain": self.domain[ids],
        }

    def lengths(self, ids) -> np.ndarray:
        """Slots each global sample takes in a packed row (its label tokens)."""
        d, local = self.locate(torch.atleast_1d(torch.as_tensor(ids, dtype=torch.long)))
        out = np.empty(len(d), dtype=np.int64)
        for k in torch.unique(d).tolist():
            where = (d == k).numpy()
            out[where] = self.sets[k].lengths(local[where].numpy())
        return out

    def packed_batch(self, ids, rows, offsets, n_rows: int, first_row: int = 0) -> dict:
        """A packed batch (`dataflex.core.packing`): samples `ids` written back to back into `n_rows` rows of
        seq_len slots, sample i at row `rows[i] - first_row`, slots [offsets[i], offsets[i] + length),
        positions restarting at 0; `segment_ids` -1 and positions counting on from 0 on the slots left empty."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        rows = torch.as_tensor(rows, dtype=torch.long) - first_row
        offsets = torch.as_tensor(offsets, dtype=torch.long)
        T, S = self.seq_len, len(ids)
        flat = [torch.zeros(n_rows * T, dtype=torch.long) for _ in range(2)]
        mask = torch.zeros(n_rows * T, dtype=torch.bool)
        seg = torch.full((n_rows * T,), -1, dtype=torch.long)
        pos = torch.full((n_rows * T,), -1, dtype=torch.long)
        lengths = torch.from_numpy(self.lengths(ids)) if S else torch.zeros(0, dtype=torch.long)
        which = torch.repeat_interleave(torch.arange(S), lengths)
        p = torch.arange(int(lengths.sum())) - torch.repeat_interleave(torch.cumsum(lengths, 0) - lengths, lengths)
        dest = rows[which] * T + offsets[which] + p
        seg[dest], pos[dest] = which, p
        d, local = self.locate(ids) if S else (torch.zeros(0, dtype=torch.long),) * 2
        for k in torch.unique(d).tolist():          # each domain's samples, their tokens only
            mine = torch.nonzero(d == k).flatten()
            slots = dest[(d == k)[which]]                   # in sample order, then position: as tokens() gives them
            inputs, labels, lmask = self.sets[k].tokens(local[mine], lengths[mine])
            flat[0][slots], flat[1][slots], mask[slots] = inputs, labels, lmask.bool()
        empty = seg < 0                     # positions of empty slots count 0, 1, ... within each gap
        if empty.any():
            e = empty.view(n_rows, T).long()
            run_start = torch.diff(e, prepend=torch.zeros(n_rows, 1, dtype=torch.long), dim=1) == 1
            idx = torch.arange(T).expand(n_rows, T)
            start_at = torch.where(run_start, idx, torch.zeros_like(idx)).cummax(1).values
            pos = torch.where(empty, (idx - start_at).reshape(-1), pos)
        return {
            "input_ids": flat[0].view(n_rows, T),
            "labels": flat[1].view(n_rows, T),
            "loss_mask": mask.view(n_rows, T).float(),
            "position_ids": pos.view(n_rows, T),
            "segment_ids": seg.view(n_rows, T),
            "sample_id": ids,
            "domain": self.domain[ids],
            "row": rows + first_row,
        }

    def describe(self) -> dict:
        """How to find a sample again without this process (RUN_DIR/data.json, read by launch/where.py)."""
        return {"seq_len": self.seq_len, "names": self.names, "sizes": self.sizes,
                "domains": [getattr(s, "source", None) for s in self.sets]}
