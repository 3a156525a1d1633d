"""Near-duplicate removal with MinHash LSH from ``datasketch`` (in-memory index)."""
from __future__ import annotations

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from dataprep.document import Document
from dataprep.steps.base import DedupStep

_SCHEME = "affine32"


_hash32 = xxhash.xxh32_intdigest  # 32-bit shingle hash (a C function: no Python call per shingle)


class _LSHIndex:
    """datasketch ``MinHashLSH`` plus a check of the estimated Jaccard against the candidates, so a
    document is dropped only if some kept document is estimated at least ``threshold`` similar."""

    def __init__(self, threshold: float, num_perm: int, seed: int):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.threshold, self.num_perm, self.seed = threshold, num_perm, seed
        self.values: dict[str, np.ndarray] = {}

    def check_and_add(self, key: str, sig: bytes) -> str | None:
        hv = np.frombuffer(sig, dtype=np.uint64)
        mh = LeanMinHash(seed=self.seed, hashvalues=hv, scheme=_SCHEME)
        for cand in sorted(self.lsh.query(mh)):
            if float(np.mean(self.values[cand] == hv)) >= self.threshold:
                return "near_duplicate"
        self.lsh.insert(key, mh, check_duplication=False)
        self.values[key] = hv
        return None


class MinHashDedup(DedupStep):
    """Drop documents whose word n-gram set is estimated ``threshold``-similar (Jaccard) to a kept one.

    Args:
        threshold: Jaccard similarity at and above which a document is a near duplicate.
        num_perm: MinHash permutations (signature length).
        ngram: shingle size in words (lowercased); shorter documents use one shingle.
        seed: permutation seed (fixed, so signatures are reproducible).
        scope: ``global`` or ``domain``.
    Reason: ``near_duplicate``. Exact copies are near duplicates too: put ``ExactDedup`` first to count
    them apart.
    """

    name = "minhash_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                 scope: str = "global", domains=None):
        super().__init__(scope=scope, domains=domains, threshold=threshold, num_perm=num_perm, ngram=ngram,
                         seed=seed)
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_hash32, scheme=_SCHEME)

    def shingles(self, text: str) -> set[bytes]:
        words = text.lower().split()
        n = self.ngram
        if len(words) <= n:
            return {" ".join(words).encode("utf-8", "surrogatepass")}
        return {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}

    def signature(self, doc: Document) -> bytes:
        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_hash32,
                    permutations=self._template.permutations, scheme=_SCHEME)
        m.update_batch(self.shingles(doc.text))
        return np.asarray(m.hashvalues, dtype=np.uint64).tobytes()

    def new_index(self) -> _LSHIndex:
        return _LSHIndex(self.threshold, self.num_perm, self.seed)
