"""Megatron indexed-dataset shards (``.bin``/``.idx``) written with megatron-core's own
``IndexedDatasetBuilder``: one sequence per document (its tokens, EOS included), cut into shards of about
``shard_bytes`` of ``.bin``. Files are written under ``.tmp`` names and renamed when complete."""
from __future__ import annotations

import fcntl
import hashlib
import os
from contextlib import contextmanager

import numpy as np


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> str:
    """The dtype Megatron picks for this vocabulary: the rule of megatron-core's ``DType.optimal_dtype``
    (uint16 below 65500 ids, else int32), restated so choosing it does not import megatron-core
    (a test checks both agree)."""
    return "uint16" if vocab_size is not None and vocab_size < 65500 else "int32"


class ShardWriter:
    """Writes ``{out_dir}/{shard_dir}/{name}_{k:05d}.{bin,idx}``; ``add`` returns (prefix, index in shard)."""

    def __init__(self, shard_dir: str, name: str, dtype: str, shard_bytes: int, out_dir: str,
                 owned_log: str | None = None):
        from dataprep.safety import inside

        inside(shard_dir, out_dir, "shard folder")      # names are checked earlier; this proves the result
        os.makedirs(shard_dir, exist_ok=True)
        self.owned_log = owned_log
        self.shard_dir, self.name, self.dtype = shard_dir, name, np.dtype(dtype)
        self.shard_bytes, self.out_dir = int(shard_bytes), out_dir
        self.records: list[dict] = []
        self._builder = None
        self._k = 0

    def _open(self) -> None:
        from dataprep.megatron_io import indexed_dataset
        IndexedDatasetBuilder = indexed_dataset()[1]

        self._prefix = os.path.join(self.shard_dir, f"{self.name}_{self._k:05d}")
        if self.owned_log:      # recorded before the file exists: a killed run's files stay known as ours
            note_owned(self.owned_log, [os.path.relpath(self._prefix, self.out_dir)])
        self._builder = IndexedDatasetBuilder(self._prefix + ".bin.tmp", dtype=self.dtype.type)
        self._docs = self._tokens = self._bytes = 0

    def add(self, tokens: np.ndarray) -> tuple[str, int]:
        import torch

        if self._builder is None:
            self._open()
        arr = np.asarray(tokens).astype(self.dtype, copy=False)
        self._builder.add_item(torch.from_numpy(np.ascontiguousarray(arr)))
        self._builder.end_document()
        idx = self._docs
        self._docs += 1
        self._tokens += arr.size
        self._bytes += arr.nbytes
        rel = os.path.relpath(self._prefix, self.out_dir)
        if self._bytes >= self.shard_bytes:
            self._finish()
        return rel, idx

    def _finish(self) -> None:
        self._builder.finalize(self._prefix + ".idx.tmp")
        os.replace(self._prefix + ".bin.tmp", self._prefix + ".bin")
        os.replace(self._prefix + ".idx.tmp", self._prefix + ".idx")
        b, i = self._prefix + ".bin", self._prefix + ".idx"
        self.records.append({"prefix": os.path.relpath(self._prefix, self.out_dir), "documents": self._docs,
                             "tokens": self._tokens, "bin": {"bytes": os.path.getsize(b), "sha256": sha256_file(b)},
                             "idx": {"bytes": os.path.getsize(i), "sha256": sha256_file(i)}})
        self._builder = None
        self._k += 1

    def close(self) -> list[dict]:
        if self._builder is not None:
            self._finish()
        return self.records


SHARD_SUFFIXES = (".bin", ".idx", ".bin.tmp", ".idx.tmp")


def note_owned(log: str, prefixes) -> None:
    """Append shard prefixes (relative to the output folder) to the log of files dataprep wrote there; one
    O_APPEND write a line, so parallel writers never interleave."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for p in prefixes:
            os.write(fd, (p + "\n").encode("utf-8"))
    finally:
        os.close(fd)


@contextmanager
def file_lock(path):
    """An exclusive flock on `path` (created) for the with-block: one builder at a time across processes."""
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
