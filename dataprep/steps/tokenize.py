"""Tokenization with the training tokenizer (a Hugging Face ``tokenizers`` JSON file)."""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import numpy as np

from dataprep.document import Document
from dataprep.steps.base import Step
from dataprep.tokenizer import default_tokenizer_path, load_tokenizer


class Tokenize(Step):
    """Encode ``doc.text`` into ``doc.metadata["tokens"]`` (numpy array), appending the EOS id.

    Args:
        tokenizer: path of the tokenizer JSON (``${data.tokenizer}`` in the default chain).
        batch_size: documents per ``encode_batch`` call.
        append_eos: append ``eos_id`` after each document's tokens.
    The tokenizer is loaded lazily (in the worker that uses it) with ``dataprep.tokenizer.load_tokenizer``.
    """

    name = "tokenize"

    def __init__(self, tokenizer=None, batch_size: int = 256, append_eos: bool = True, domains=None):
        if tokenizer in (None, "", "None"):     # no tokenizer in the data config: the embedded one, as training
            tokenizer = default_tokenizer_path()
        super().__init__(domains=domains, tokenizer=str(tokenizer), batch_size=batch_size, append_eos=append_eos)
        self.tokenizer_path, self.batch_size, self.append_eos = str(tokenizer), batch_size, append_eos
        self._tok = None

    @property
    def tokenizer(self):
        if self._tok is None:
            self._tok = load_tokenizer(self.tokenizer_path)
        return self._tok

    def _flush(self, batch: list[Document]) -> list[Document]:
        t0 = time.perf_counter()
        tok = self.tokenizer
        todo = [d for d in batch if self.applies(d)]
        for d, ids in zip(todo, tok.encode_batch([d.text for d in todo])):
            if self.append_eos:
                ids.append(tok.eos_id)
            d.metadata["tokens"] = np.asarray(ids, dtype=np.int64)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.docs_out += len(batch)
        return batch

    def run(self, docs: Iterable[Document]) -> Iterator[Document]:
        batch: list[Document] = []
        for doc in docs:
            self.stats.docs_in += 1
            batch.append(doc)
            if len(batch) >= self.batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)
