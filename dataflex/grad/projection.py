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


class SparseProjector:
    """Sparse Johnson-Lindenstrauss projection (CountSketch, Charikar et al. 2002, with `nnz`
    nonzeros per coordinate: the sparse JL of Kane & Nelson 2014):

        Phi(x)_k = sum_j sum_{r < s} [h_r(j) = k] sigma_r(j) x_j / sqrt(s),   E[Phi^T Phi] = I

    with buckets h_r(j) uniform in the r-th of s equal slices of [0, d) (no collisions) and signs
    sigma_r(j) = +-1. Costs O(B P s) instead of the
    dense O(B P d); inner products are unbiased, and for gradients that are not dominated by a few
    coordinates their variance is that of a dense projection. Hashes are generated per block of
    `block_size` coordinates from a generator seeded by (seed, block index), as in
    RademacherProjector, so a gradient's features never depend on the chunking of samples or of
    coordinates. `per_sample_grads` gets the exact per-sample gradients from the hook engine of
    `dataflex.grad.ghost` one parameter at a time ([B, numel] of one parameter, then dropped), or from
    vmap chunk by chunk, so memory stays bounded.
    Unlike LESS's dense features these are scaled (E||Phi x||^2 = ||x||^2); cosines are unaffected.
    """
    kind = "dataflex.sparse_jl.v1"

    def __init__(self, dim: int, seed: int = 0, nnz: int = 1, block_size: int = 2 ** 16, cache_mb: int = 256,
                 engine: str = "hooks"):
        """`engine`: where exact per-sample gradients come from, "hooks" (dataflex.grad.ghost, one
        parameter at a time) or "vmap" (torch.func, chunk by chunk); the features are the same."""
        if engine not in ("hooks", "vmap"):
            raise ValueError(f"engine must be 'hooks' or 'vmap', got {engine!r}")
        self.engine = engine
        if dim <= 0 or nnz <= 0:
            raise ValueError(f"projection dim and nnz must be positive, got {dim}, {nnz}")
        if nnz > dim:
            raise ValueError(f"nnz={nnz} nonzeros per coordinate need dim >= nnz, got dim={dim}")
        self.dim, self.seed, self.nnz, self.block_size = dim, seed, nnz, block_size
        self.cache_bytes = cache_mb * 2 ** 20
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cached_bytes = 0

    def _hashes(self, index: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(buckets [block_size, nnz] int64, signs [block_size, nnz] float32) of block `index`: a
        coordinate's hashes depend only on (seed, coordinate), never on the vector's length."""
        key = (index, str(device))
        if key in self._cache:
            return self._cache[key]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        # block construction (Kane & Nelson): the r-th nonzero falls in the r-th of s slices of
        # [0, d), so a coordinate's s nonzeros never collide
        edges = torch.tensor([r * self.dim // self.nnz for r in range(self.nnz + 1)])
        draws = torch.randint(0, 2 ** 62, (self.block_size, self.nnz), generator=g)
        buckets = draws % (edges[1:] - edges[:-1]) + edges[:-1]
        signs = (torch.randint(0, 2, (self.block_size, self.nnz), generator=g) * 2 - 1).float() / self.nnz ** 0.5
        buckets, signs = buckets.to(device), signs.to(device)
        size = buckets.numel() * 12
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = (buckets, signs)
            self._cached_bytes += size
        return buckets, signs

    def matrix(self, num_params: int) -> torch.Tensor:
        """The full P x d matrix (float32), for tests and small problems."""
        return self.project(torch.eye(num_params))

    def project(self, flat: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """[B, n] -> [B, d] (float32): the projection of coordinates offset .. offset + n of a
        longer vector, so a gradient can be projected one parameter at a time and summed.
        Accumulated transposed: index_add_ over contiguous rows of B."""
        B, n = flat.shape
        out = torch.zeros(self.dim, B, dtype=torch.float32, device=flat.device)
        pos = 0
        while pos < n:
            index, first = divmod(offset + pos, self.block_size)
            rows = min(self.block_size - first, n - pos)
            buckets, signs = self._hashes(index, flat.device)
            x = flat[:, pos:pos + rows].T.float()                              # [rows, B]
            src = (x.unsqueeze(1) * signs[first:first + rows].unsqueeze(2)).reshape(rows * self.nnz, B)
            out.index_add_(0, buckets[first:first + rows].flatten(), src)
            pos += rows
        return out.T.contiguous()

    def describe(self) -> dict:
        return {"projector": self.kind, "dim": self.dim, "seed": self.seed, "nnz": self.nnz,
                "block_size": self.block_size, "scale": True}
