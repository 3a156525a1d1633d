"""Near-duplicate removal: MinHash LSH (``datasketch``, in-memory index) for candidates, then a check of
each candidate's Jaccard similarity against the configured threshold.

LSH alone decides at a soft threshold: with b bands of r rows a pair at Jaccard s becomes a candidate
with probability 1 - (1 - s^r)^b, so banding tuned *at* the threshold (datasketch's default for 0.8
and 128 permutations: b = 9, r = 13) misses pairs well above it (J = 0.88 about one time in six). Here,
as NeMo Curator and datatrove's candidate-then-verify pipelines do, the bands are tuned for a lower
threshold: the most rows per band whose candidate probability at J = ``threshold`` is still at least
``recall`` (0.999: b = 25, r = 5 at 0.8 and 128 permutations, a pair at J = 0.8 is missed with
probability 5e-5), and every candidate is verified:

* ``verify: exact`` (default): the exact Jaccard of the two documents' shingle sets (32-bit hashes of
  the word n-grams, the values the MinHash is computed from), so a pair below the threshold is never
  removed and a pair at or above it is removed unless LSH missed it (probability <= 1 - ``recall``).
  The signature carries the document's sorted shingle hashes (4 bytes a shingle) next to its MinHash.
* ``verify: minhash``: the MinHash estimate of the Jaccard (the share of equal signature values), a
  compact signature (8 bytes a permutation) but a soft decision: its standard deviation is
  sqrt(J (1 - J) / num_perm) (0.035 at J = 0.8, 128 permutations), so pairs within a few hundredths
  of the threshold go either way.
"""
from __future__ import annotations

import numpy as np
import xxhash
from datasketch import LeanMinHash, MinHash, MinHashLSH

from dataprep.document import Document
from dataprep.steps.base import DedupStep

_SCHEME = "affine32"
VERIFY = ("exact", "minhash")


_hash32 = xxhash.xxh32_intdigest  # 32-bit shingle hash (a C function: no Python call per shingle)


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """Probability that a pair at Jaccard s shares at least one of `bands` bands of `rows` rows."""
    return 1.0 - (1.0 - s ** rows) ** bands


def lsh_bands(threshold: float, num_perm: int, recall: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band (the fewest candidates to verify) whose candidate
    probability at Jaccard `threshold` is at least `recall`, with bands = num_perm // rows."""
    feasible = [(num_perm // r, r) for r in range(1, num_perm + 1)
                if candidate_probability(threshold, num_perm // r, r) >= recall]
    if not feasible:
        raise ValueError(f"MinHashDedup: no LSH banding of {num_perm} permutations reaches recall {recall} at "
                         f"Jaccard {threshold}; raise num_perm or lower recall")
    return max(feasible, key=lambda br: br[1])


def exact_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Jaccard similarity of two sorted arrays of distinct shingle hashes."""
    inter = np.intersect1d(a, b, assume_unique=True).size
    union = a.size + b.size - inter
    return inter / union if union else 1.0


class _LSHIndex:
    """datasketch ``MinHashLSH`` banded for `recall` at `threshold`, and the verification of the
    candidates: a document is dropped only if a kept candidate is at least ``threshold`` similar."""

    def __init__(self, threshold: float, num_perm: int, seed: int, bands: tuple[int, int], verify: str):
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=bands)
        self.threshold, self.num_perm, self.seed, self.verify = threshold, num_perm, seed, verify
        self.values: dict[str, np.ndarray] = {}

    def check_and_add(self, key: str, sig: bytes) -> str | None:
        hv = np.frombuffer(sig, dtype=np.uint64, count=self.num_perm)
        mh = LeanMinHash(seed=self.seed, hashvalues=hv, scheme=_SCHEME)
        if self.verify == "exact":
            mine = np.frombuffer(sig, dtype=np.uint32, offset=self.num_perm * 8)
            similar = lambda other: exact_jaccard(mine, other) >= self.threshold  # noqa: E731
        else:
            mine = hv
            similar = lambda other: float(np.mean(other == hv)) >= self.threshold  # noqa: E731
        for cand in sorted(self.lsh.query(mh)):
            if similar(self.values[cand]):
                return "near_duplicate"
        self.lsh.insert(key, mh, check_duplication=False)
        self.values[key] = mine
        return None


class MinHashDedup(DedupStep):
    """Drop documents whose word n-gram set is ``threshold``-similar (Jaccard) to a kept one.

    Args:
        threshold: Jaccard similarity at and above which a document is a near duplicate.
        num_perm: MinHash permutations (signature length).
        ngram: shingle size in words (lowercased); shorter documents use one shingle.
        seed: permutation seed (fixed, so signatures are reproducible).
        recall: the LSH bands are chosen so that a pair at J = ``threshold`` becomes a candidate with at
            least this probability (pairs above it: more).
        verify: ``exact`` (the shingle sets' Jaccard, the default) or ``minhash`` (the estimate).
        scope: ``global`` or ``domain``.
    Reason: ``near_duplicate``. Exact copies are near duplicates too: put ``ExactDedup`` first to count
    them apart.
    """

    name = "minhash_dedup"

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1,
                 recall: float = 0.999, verify: str = "exact", scope: str = "global", domains=None):
        if verify not in VERIFY:
            raise ValueError(f"MinHashDedup: verify must be one of {VERIFY}, got {verify!r}")
        if not 0.0 < threshold <= 1.0 or not 0.0 < recall < 1.0:
            raise ValueError(f"MinHashDedup: threshold must be in (0, 1] and recall in (0, 1), got {threshold}, {recall}")
        super().__init__(scope=scope, domains=domains, threshold=threshold, num_perm=num_perm, ngram=ngram,
                         seed=seed, recall=recall, verify=verify)
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self.recall, self.verify = recall, verify
        self.bands = lsh_bands(threshold, num_perm, recall)
        self._template = MinHash(num_perm=num_perm, seed=seed, hashfunc=_hash32, scheme=_SCHEME)

    @property
    def band_threshold(self) -> float:
        """The Jaccard at which LSH's candidate probability crosses its steepest point, (1/b)^(1/r)."""
        b, r = self.bands
        return (1.0 / b) ** (1.0 / r)

    def shingles(self, text: str) -> set[bytes]:
        words = text.lower().split()
        n = self.ngram
        if len(words) <= n:
            return {" ".join(words).encode("utf-8", "surrogatepass")}
        return {" ".join(words[i:i + n]).encode("utf-8", "surrogatepass") for i in range(len(words) - n + 1)}

    def signature(self, doc: Document) -> bytes:
        shingles = self.shingles(doc.text)
        m = MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_hash32,
                    permutations=self._template.permutations, scheme=_SCHEME)
        m.update_batch(shingles)
        sig = np.asarray(m.hashvalues, dtype=np.uint64).tobytes()
        if self.verify == "exact":
            hashes = np.fromiter(map(_hash32, shingles), dtype=np.uint32, count=len(shingles))
            sig += np.unique(hashes).tobytes()
        return sig

    def new_index(self) -> _LSHIndex:
        return _LSHIndex(self.threshold, self.num_perm, self.seed, self.bands, self.verify)
