"""Ranks agree on every data decision: each step's decisions (domain weights, drawn and kept ids, domain loss
weights) and the previous step's final sample weights travel as a hash inside the per-step loss gather, so ranks
are compared every step at no extra collective; `check_ranks_agree` compares the whole step at checkpoints."""
from __future__ import annotations

import hashlib

import torch

from dataflex.utils import dist


def digest(*tensors) -> bytes:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.digest()


def decision_digest(state, last_weights_digest: bytes) -> list:
    """48 bits of a hash of this step's data decisions and 48 of the previous step's final sample weights,
    as four floats exact in float32 (they ride in the loss gather)."""
    cur = digest(state.domain_weights, state.candidate_ids, state.keep_mask, state.domain_loss_weights)
    prev = hashlib.sha256(last_weights_digest).digest()
    return [float(int.from_bytes(d[i:i + 3], "little")) for d in (cur, prev) for i in (0, 3)]


def compare_digests(gathered: torch.Tensor, per_rank: int, step: int) -> None:
    """Columns 3-4 of the gathered loss rows: this step's data; 5-6: the previous step's sample weights."""
    for cols, what, at in (((3, 4), "data", step), ((5, 6), "sample weights", step - 1)):
        part = gathered[:, list(cols)]
        bad = (part != part[:1]).any(1)
        if bad.any():
            ranks = sorted({i // per_rank for i in torch.nonzero(bad).flatten().tolist()})
            raise RuntimeError(f"ranks disagree on the {what} of step {at} (rank(s) {ranks} differ from "
                               "rank 0): every plugin must decide from gathered signals and seeded RNGs")


def check_ranks_agree(state, weights) -> None:
    """Every rank must have drawn, kept and weighted the same global batch; a divergence (a plugin using an
    unseeded RNG, a rank-local signal) would silently train on other data. One collective."""
    h = hashlib.sha256()
    for t in (state.domain_weights, state.batch_ids, weights, state.token_weights):
        if t is not None:
            h.update(t.detach().cpu().numpy().tobytes())
    mine = torch.tensor([int.from_bytes(h.digest()[:8], "little", signed=True)])
    everyone = dist.all_gather_cat(mine)
    if (everyone != everyone[0]).any():
        raise RuntimeError(f"ranks disagree on the data of step {state.step} (decision hashes "
                           f"{everyone.tolist()}): every plugin must decide from gathered signals and seeded RNGs")
