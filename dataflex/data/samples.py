"""Documents as fixed-length samples: tokenized (end-of-text appended) and cut into `seq_len`-label chunks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import numpy as np
import torch

from dataflex.data.config import expand_paths, read_documents
from dataflex.utils.errors import DataConfigError
from dataprep.tokenizer import Tokenizer


@dataclass
class SampleSet:
    """One domain split as fixed-length samples, with the document each sample came from."""
    input_ids: torch.Tensor          # [N, T] long
    labels: torch.Tensor             # [N, T] long
    loss_mask: torch.Tensor          # [N, T] bool
    doc_ids: list = field(default_factory=list)
    chunks: list = field(default_factory=list)
    _lengths: Optional[np.ndarray] = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long)
        return self.input_ids[ids], self.labels[ids], self.loss_mask[ids]

    def tokens(self, ids, lengths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `lengths[i]` slots of each sample, concatenated: input ids, labels, loss mask (flat)."""
        ids, n = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(lengths, dtype=torch.long)
        which = torch.repeat_interleave(ids, n)
        p = torch.arange(int(n.sum())) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        return self.input_ids[which, p], self.labels[which, p], self.loss_mask[which, p]

    def lengths(self, ids):
        """Slots each sample takes in a packed row: up to and including its last label token."""
        if self._lengths is None or len(self._lengths) != len(self):
            T = self.seq_len
            last = torch.where(self.loss_mask, torch.arange(1, T + 1), torch.zeros((), dtype=torch.long)).amax(-1) \
                if len(self) else torch.zeros(0, dtype=torch.long)
            self._lengths = last.numpy()
        return self._lengths[np.asarray(ids, dtype=np.int64)]


def chunk_documents(docs: Iterable[tuple[str, list[int]]], seq_len: int, pad_id: int) -> SampleSet:
    inputs, labels, masks, doc_ids, chunks = [], [], [], [], []
    for doc_id, tokens in docs:
        tokens = list(tokens)
        for c, start in enumerate(range(0, max(len(tokens) - 1, 0), seq_len)):
            piece = tokens[start:start + seq_len + 1]
            n = len(piece) - 1
            pad = seq_len - n
            inputs.append(piece[:-1] + [pad_id] * pad)
            labels.append(piece[1:] + [pad_id] * pad)
            masks.append([True] * n + [False] * pad)
            doc_ids.append(doc_id)
            chunks.append(c)
    if not inputs:
        return SampleSet(torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.long),
                         torch.zeros(0, seq_len, dtype=torch.bool))
    return SampleSet(torch.tensor(inputs), torch.tensor(labels), torch.tensor(masks), doc_ids, chunks)


def tokenize_documents(docs: Iterable[tuple[str, str]], tokenizer: Tokenizer, batch: int = 512):
    pending: list[tuple[str, str]] = []
    for doc in docs:
        pending.append(doc)
        if len(pending) == batch:
            yield from _encode(pending, tokenizer)
            pending = []
    yield from _encode(pending, tokenizer)


def _encode(pending, tokenizer):
    for (doc_id, _), ids in zip(pending, tokenizer.encode_batch([t for _, t in pending])):
        yield doc_id, ids + [tokenizer.eos_id]


def build_samples(spec, tokenizer: Tokenizer, seq_len: int, key: str, max_samples: Optional[int] = None) -> SampleSet:
    docs = (doc for path in expand_paths(spec, key) for doc in read_documents(path, key))
    samples = chunk_documents(tokenize_documents(docs, tokenizer), seq_len, tokenizer.eos_id)
    if len(samples) == 0:
        raise DataConfigError(f"{key}: no documents with at least two tokens in {spec}")
    return take(samples, max_samples)


def take(samples: SampleSet, n: Optional[int]) -> SampleSet:
    if n is None or len(samples) <= n:
        return samples
    return SampleSet(samples.input_ids[:n], samples.labels[:n], samples.loss_mask[:n],
                     samples.doc_ids[:n], samples.chunks[:n])
