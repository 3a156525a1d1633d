"""Seeded Rademacher random projection (TRAK / LESS): Phi(x) = R^T x, R in {-1, +1}^{P x d}.

R is never materialised whole: it is generated in row blocks of `block_size` parameters, each block
from its own generator seeded by (seed, block index), so the projection of a gradient is the same
whatever chunking of samples or parameters computed it. No 1/sqrt(d) scaling by default, as in LESS;
`describe()` is what to store next to any projected features.
"""
from __future__ import annotations

import torch


class RademacherProjector:
    kind = "dataflex.rademacher.v1"

    def __init__(self, dim: int, seed: int = 0, block_size: int = 4096, scale: bool = False):
        if dim <= 0:
            raise ValueError(f"projection dim must be positive, got {dim}")
        self.dim, self.seed, self.block_size, self.scale = dim, seed, block_size, scale

    def _block(self, index: int, rows: int, dtype, device) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        signs = torch.randint(0, 2, (rows, self.dim), generator=g, dtype=torch.int8)
        return (signs.to(dtype) * 2 - 1).to(device)

    def matrix(self, num_params: int, dtype=torch.float32) -> torch.Tensor:
        """The full P x d matrix, for tests and small problems."""
        return torch.cat([self._block(i, min(self.block_size, num_params - s), dtype, "cpu")
                          for i, s in enumerate(range(0, num_params, self.block_size))])

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """[B, P] -> [B, d]."""
        B, P = flat.shape
        out = torch.zeros(B, self.dim, dtype=flat.dtype, device=flat.device)
        for i, start in enumerate(range(0, P, self.block_size)):
            rows = min(self.block_size, P - start)
            out += flat[:, start:start + rows] @ self._block(i, rows, flat.dtype, flat.device)
        if self.scale:
            out /= self.dim ** 0.5
        return out

    def describe(self) -> dict:
        return {"projector": self.kind, "dim": self.dim, "seed": self.seed,
                "block_size": self.block_size, "scale": self.scale}
