"""Kronecker-factored projection of per-sample gradients (LoGra / LogIX: Choe et al. 2024, "What is
your data worth to GPT?", arXiv 2405.13954), computed without materialising any per-sample gradient.

For a parameter whose per-sample gradient is a matrix G_i = sum_t r_t c_t^T ([R, C]: a Linear
weight, rows = output gradients b_t, cols = inputs a_t; an Embedding, rows = one-hot tokens, cols =
output gradients), the projection is

    Phi(G_i) = (P_row G_i P_col^T).flatten()[:d_l] / sqrt(d_l)
             = sum_t (P_row r_t) (P_col c_t)^T  (flattened, truncated, scaled)
             = S (P_row (x) P_col) vec(G_i) / sqrt(d_l)

with P_row [k_r, R] and P_col [k_c, C] i.i.d. N(0, 1) and S keeping the first d_l rows of the
Kronecker product: the projected inputs and output gradients of the batch's one forward and
backward (`dataflex.grad.ghost.capture`) are all that is needed, O(T (R k_r + C k_c) + T k_r k_c) per
sample. Every row of S (P_row (x) P_col) has E[r r^T] = I, so E <Phi g, Phi g'> = <g, g'>.
Parameters that are not matrices (biases, LayerNorm / RMSNorm weights, anything the hook engine
materialises) get a dense N(0, 1) projection of their exact per-sample gradient, scaled alike.

How `dim` is split: every chosen parameter gets an equal share, capped at its number of entries,
what the caps leave over is shared again among the others (water-filling), in the order of
`select_params`; the total is min(dim, P). A matrix's share d_l is laid out as
k_small = min(small side, ceil(sqrt(d_l))), k_large = ceil(d_l / k_small) (<= its side), and the
first d_l entries of the k_r x k_c block are kept. The layout is returned with the features.

Matrices are generated on the CPU from a generator seeded by (seed, crc32 of the parameter's
name), then moved to the module's device: the same features on every process and device.
Kronecker projections are much cheaper than dense ones but noisier per dimension for low-rank
gradients (a one-token gradient's projected norm is a product of two chi-square variables).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable, Optional

import torch

from dataflex.grad.chunking import assemble, batch_samples, chunks
from dataflex.grad.factors import Factor
from dataflex.grad.ghost import EngineRun, capture, norms_squared
from dataflex.grad.params import ParamSpec, PerSampleGrads
from dataflex.models.forward import default_forward


def water_fill(dim: int, sizes: list) -> list:
    """Equal shares of `dim`, each capped at its size, the rest shared again among the others."""
    alloc, remaining, open_ = [0] * len(sizes), dim, list(range(len(sizes)))
    while remaining > 0 and open_:
        share, extra = divmod(remaining, len(open_))
        given, still = 0, []
        for j, i in enumerate(open_):
            take = min(share + (j < extra), sizes[i] - alloc[i])
            alloc[i] += take
            given += take
            if alloc[i] < sizes[i]:
                still.append(i)
        remaining, open_ = remaining - given, still
        if given == 0:
            break
    return alloc


def kron_sides(shape: tuple, d: int) -> tuple[int, int]:
    R, C = shape
    small = min(min(R, C), math.ceil(math.sqrt(d)))
    large = math.ceil(d / small)
    return (small, large) if R <= C else (large, small)


class FactoredProjector:
    kind = "dataflex.grad.factored.v1"
    factored = True                       # per_sample_grads routes it to the hook engine

    def __init__(self, dim: int, seed: int = 0, norms: bool = True):
        """`norms=False` skips the exact ghost norms that otherwise come with the features."""
        if dim <= 0:
            raise ValueError(f"projection dim must be positive, got {dim}")
        self.dim, self.seed, self.norms = dim, seed, norms
        self._cache: dict = {}

    def layout(self, shapes: dict) -> list:
        """[(name, d_l, (k_r, k_c) or None)] for name -> parameter shape, in order; d_l = 0 drops."""
        sizes = [int(torch.Size(s).numel()) for s in shapes.values()]
        out = []
        for (name, shape), d in zip(shapes.items(), water_fill(self.dim, sizes)):
            out.append((name, d, kron_sides(tuple(shape), d) if len(shape) == 2 and d else None))
        return out

    def _gaussian(self, name: str, tag: str, shape: tuple, device) -> torch.Tensor:
        key = (name, tag, shape, str(device))
        if key not in self._cache:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(f"{name}/{tag}".encode()))
            self._cache[key] = torch.randn(shape, generator=g).to(device)
        return self._cache[key]

    def matrices(self, name: str, shape: tuple, d: int, sides, device="cpu"):
        """(P_row, P_col) for a matrix parameter, or the dense [d, numel] matrix for others."""
        if sides is None:
            return self._gaussian(name, "dense", (d, int(torch.Size(shape).numel())), device)
        return (self._gaussian(name, "row", (sides[0], shape[0]), device),
                self._gaussian(name, "col", (sides[1], shape[1]), device))

    def _block(self, name, shape, d, sides, g: torch.Tensor) -> torch.Tensor:
        """The formula on a materialised per-sample gradient g [B, *shape]."""
        g = g.float()
        if sides is None:
            return g.flatten(1) @ self.matrices(name, shape, d, None, g.device).T / math.sqrt(d)
        P_row, P_col = self.matrices(name, shape, d, sides, g.device)
        block = P_row @ g.view(-1, *shape) @ P_col.T
        return block.flatten(1)[:, :d] / math.sqrt(d)

    def project_grads(self, grads: dict) -> torch.Tensor:
        """[B, total] from materialised per-sample gradients name -> [B, *shape] (the reference)."""
        shapes = {n: tuple(g.shape[1:]) for n, g in grads.items()}
        return torch.cat([self._block(n, shapes[n], d, sides, grads[n])
                          for n, d, sides in self.layout(shapes) if d], dim=1)

    def project_run(self, run: EngineRun) -> torch.Tensor:
        """[B, total] from one chunk of the hook engine: factors are projected, never materialised."""
        blocks = []
        for name, d, sides in self.layout(run.shapes):
            if not d:
                continue
            shape, parts = run.shapes[name], run.contributions[name]
            if sides is None or not all(isinstance(c, Factor) for c in parts):
                blocks.append(self._block(name, shape, d, sides, run.materialise(name)))
                continue
            total = torch.zeros(run.batch_size, sides[0], sides[1], device=run.device)
            for c in parts:
                P_row, P_col = self.matrices(name, shape, d, sides, c.cols.device)
                rows = c.project_rows(P_row)                                     # [B, T, k_r]
                rows, cols = c.samplewise(rows), c.samplewise(c.cols @ P_col.T)  # per sample (packed rows split)
                total = total + rows.transpose(1, 2) @ cols                     # [B, k_r, k_c]
            blocks.append(total.flatten(1)[:, :d] / math.sqrt(d))
        return torch.cat(blocks, dim=1)

    def describe(self) -> dict:
        return {"projector": self.kind, "dim": self.dim, "seed": self.seed, "distribution": "gaussian",
                "scale": True}


def factored_grads(module: torch.nn.Module, batch: dict, params: ParamSpec, projector: FactoredProjector,
                   chunk_size: Optional[int] = None, forward: Callable = default_forward, train_mode: bool = False,
                   call: Optional[Callable] = None, lean: bool = False) -> PerSampleGrads:
    """PerSampleGrads with `projected` [B, total] and the layout in `projector`; `norms` are the exact
    ghost norms (NaN when the projector was made with norms=False)."""
    norms, projected, index, run = [], [], [], None
    for part, samples in chunks(batch, chunk_size):
        run = capture(module, part, params, forward, train_mode, call, lean)
        projected.append(projector.project_run(run))
        norms.append(norms_squared(run).clamp(min=0).sqrt() if projector.norms
                     else torch.full((run.batch_size,), float("nan"), device=projected[-1].device))
        index.append(samples)
    layout = [(n, d, list(s) if s else None) for n, d, s in projector.layout(run.shapes) if d]
    n = batch_samples(batch)
    return PerSampleGrads(assemble(norms, index, n), projected=assemble(projected, index, n),
                          projector={**projector.describe(), "layout": layout, "fallback": run.fallback})
