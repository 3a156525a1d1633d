"""Length-matched random selection: a random subset of the pool with the same length distribution and the
same token budget as another selector's choice (the baseline that careful re-tests of LESS found as strong
as LESS itself: part of what a selector "finds" is only longer or shorter samples).

Given a selection S (the sample ids a pool selector kept: its exported `*_selection.json` in the folder of a
finished run on the same data, `selector.reference`) and every pool sample's length (real tokens), the pool's lengths are cut into `bins`
equal-width bins; for each bin the same number of samples as S has there is drawn uniformly at random,
without replacement, from all the pool's samples in that bin (S's own included). The draw has S's length
histogram bin for bin, its size, and its token total to within one bin width per sample; which domain a
sample comes from is left to chance. The draw is a function of the seed only, so every rank keeps the same
samples. Kept through the sampler's pool masks from step 0, like the selection it matches.

    +selector=length_matched selector.reference=RUN_DIR   # or RUN_DIR/near_selection.json
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from dataflex.core.state import DataState
from dataflex.selectors.pool import PoolSelector, sample_lengths


def length_bins(lengths: torch.Tensor, bins: int) -> torch.Tensor:
    """[N] long: each length's bin among `bins` equal-width bins over [min, max] of `lengths` (the last closed)."""
    lengths = lengths.double()
    lo, hi = float(lengths.min()), float(lengths.max())
    if hi == lo:
        return torch.zeros(len(lengths), dtype=torch.long)
    return ((lengths - lo) / (hi - lo) * bins).floor().long().clamp(max=bins - 1)


def length_matched(lengths: torch.Tensor, selected: torch.Tensor, bins: int, seed: int) -> torch.Tensor:
    """[N] bool: per length bin, as many samples as `selected` (ids into the pool) has there, drawn uniformly
    without replacement from the pool's samples in that bin, with a generator seeded by `seed`."""
    selected = torch.as_tensor(selected, dtype=torch.long)
    if len(selected) == 0:
        raise ValueError("length_matched: the selection to match is empty")
    if int(selected.min()) < 0 or int(selected.max()) >= len(lengths):
        raise ValueError(f"length_matched: the selection holds sample ids outside this pool of {len(lengths)} "
                         "(was it made on other data?)")
    which = length_bins(lengths, bins)
    want = torch.bincount(which[selected.unique()], minlength=bins)
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + 17)
    keep = torch.zeros(len(lengths), dtype=torch.bool)
    for b in torch.nonzero(want).flatten().tolist():
        members = torch.nonzero(which == b).flatten()
        keep[members[torch.randperm(len(members), generator=g)[:int(want[b])]]] = True
    return keep


def read_selection(path: str) -> torch.Tensor:
    """The sample ids of a selection file ({"sample_ids": [...]}), or of the one *_selection.json in a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        found = sorted(p.glob("*selection.json"))
        if len(found) != 1:
            raise FileNotFoundError(f"selector.reference={path}: {len(found)} *selection.json files in the folder "
                                    f"({', '.join(f.name for f in found) or 'none'}); name one")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"selector.reference={path}: no such file (a pool selector's exported "
                                "*_selection.json, written at the end of its run)")
    return torch.tensor(json.loads(p.read_text())["sample_ids"], dtype=torch.long)


class LengthMatchedSelector(PoolSelector):
    # checked before any data is read (dataflex.core.settings)
    SETTINGS = {"bins": "[1, inf)"}
    export_name = "length_matched_selection.json"

    def __init__(self, reference: str, bins: int = 20, seed: int = 0):
        """`reference`: the run whose selection to match (its folder, or its *_selection.json)."""
        super().__init__()
        if bins < 1:
            raise ValueError(f"selector.bins must be >= 1, got {bins}")
        self.reference, self.bins, self.seed = str(reference), bins, seed
        self.matched = read_selection(self.reference)                  # fails early on a bad path

    def choose(self, state: DataState):
        data = state.signals.flex.data
        lengths = sample_lengths(data, torch.arange(len(data)))
        keep = length_matched(lengths, self.matched, self.bins, self.seed)
        return keep, lengths.double()                                  # "scores": the kept samples' lengths

    def describe(self) -> dict:
        return {"reference": self.reference, "bins": self.bins, "seed": self.seed,
                "matched_samples": len(self.matched.unique())}
