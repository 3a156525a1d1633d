"""Exact deduplication on a content hash (the first occurrence in canonical order is kept)."""
from __future__ import annotations

import hashlib

from dataprep.document import Document
from dataprep.steps.base import DedupStep


class _HashIndex:
    def __init__(self):
        self.seen: set[bytes] = set()

    def check_and_add(self, key: str, sig: bytes) -> str | None:
        if sig in self.seen:
            return "exact_duplicate"
        self.seen.add(sig)
        return None


class ExactDedup(DedupStep):
    """Drop documents whose text (after the preceding steps) hashes like an earlier one.

    Args:
        scope: ``global`` or ``domain`` (see ``DedupStep``).
        lowercase: hash the lowercased text (case-insensitive dedup).
    Reason: ``exact_duplicate``. Signature: 16 bytes of blake2b.
    """

    name = "exact_dedup"

    def __init__(self, scope: str = "global", lowercase: bool = False, domains=None):
        super().__init__(scope=scope, domains=domains, lowercase=lowercase)
        self.lowercase = lowercase

    def signature(self, doc: Document) -> bytes:
        text = doc.text.lower() if self.lowercase else doc.text
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def new_index(self) -> _HashIndex:
        return _HashIndex()
