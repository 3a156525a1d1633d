"""Training samples read from memory-mapped Megatron shards (``.bin``/``.idx``), never loaded whole.

A `ShardSampleSet` is one domain split: megatron-core `IndexedDataset`s over its shards (memory-mapped)
and a sample index built the way Megatron's GPTDataset builds one: numpy arrays computed once from the
shards' sequence lengths, saved beside the shards under a name keyed by seq_len and the shards' hashes,
and memory-mapped on every later launch. dataflex cuts each document into samples of ``seq_len`` labels
(the last one padded and masked; samples never cross documents), so the index is per document:

* ``doc_shard``: [S+1] first document of each shard in the concatenation of the shards;
* ``sample_start``: [D+1] the first sample of each document (a cumulative count), so sample ``i`` is
  chunk ``i - sample_start[d]`` of document ``d = searchsorted(sample_start, i, "right") - 1``.

Memory is O(documents) on disk and O(batch) in RAM: a batch reads its rows from the page cache.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from typing import Optional, Sequence

import numpy as np
import torch

from dataflex.utils.errors import ShardError
from dataflex.utils.files import atomic_json, atomic_write
from dataprep.megatron_io import indexed_dataset

INDEX_VERSION = 1


def open_indexed(prefix: str):
    """megatron-core's IndexedDataset, memory-mapped. Training reads samples in random order, so the
    maps are advised MADV_RANDOM: the kernel's read-around (often MBs a fault) would otherwise pull
    pages no sample needs into the process's resident set."""
    IndexedDataset = indexed_dataset()[0]

    ds = IndexedDataset(prefix, mmap=True)
    for holder in (getattr(ds, "bin_reader", None), getattr(ds, "index", None)):
        raw = getattr(getattr(holder, "_bin_buffer_mmap", None), "_mmap", None)
        if raw is not None and hasattr(mmap, "MADV_RANDOM"):
            try:
                raw.madvise(mmap.MADV_RANDOM)
            except (OSError, ValueError):
                pass
    return ds


def _sample_counts(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Samples of a document of n tokens (EOS included): ceil((n - 1) / seq_len), 0 below 2 tokens."""
    n = np.asarray(lengths, dtype=np.int64)
    return np.where(n > 1, (n - 1 + seq_len - 1) // seq_len, 0)


def index_key(seq_len: int, shard_hashes: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps({"v": INDEX_VERSION, "seq_len": seq_len, "shards": list(shard_hashes)}).encode())
    return f"seq{seq_len}-{h.hexdigest()[:20]}"


# np.load parses each .npy header with ast.literal_eval, and CPython 3.11 keeps the AST constructor's recursion
# depth per interpreter, not per thread: two threads parsing at once can fail with "SystemError: AST constructor
# recursion depth mismatch" (python/cpython#106905; seen with eight threads opening one index). Threads of a process
# open index files one at a time (processes are unaffected).
_NPY_OPEN = threading.Lock()


def _load_index(paths: list, marker: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The saved index, memory-mapped, only once its completion marker exists and agrees with the
    arrays' lengths; None otherwise (not written yet, or written by a process that died midway)."""
    try:
        with open(marker) as f:
            lengths = json.load(f)["lengths"]
        with _NPY_OPEN:
            arrays = tuple(np.load(p, mmap_mode="r") for p in paths)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays if [len(a) for a in arrays] == list(lengths) else None


def build_or_load_index(datasets: list, seq_len: int, index_dir: Optional[str], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(doc_shard, sample_start): loaded memory-mapped from ``index_dir/key.*.npy`` once their marker
    ``key.done.json`` exists, else built from the shards' sequence lengths (in blocks, so memory stays
    small) and saved: each array under a temporary name of its own, fsynced and renamed, then the marker
    the same way. Ranks that build together write identical bytes; none reads a part."""

    paths = marker = None
    if index_dir:
        paths = [os.path.join(index_dir, f"{key}.{name}.npy") for name in ("doc_shard", "sample_start")]
        marker = os.path.join(index_dir, f"{key}.done.json")
        loaded = _load_index(paths, marker)
        if loaded is not None:
            return loaded
    docs = np.array([0] + [len(ds) for ds in datasets], dtype=np.int64).cumsum()
    start = np.empty(int(docs[-1]) + 1, dtype=np.int64)
    start[0], pos, total, block = 0, 1, 0, 1 << 20
    for ds in datasets:
        lengths = ds.sequence_lengths
        for b in range(0, len(lengths), block):
            counts = _sample_counts(lengths[b:b + block], seq_len).cumsum() + total
            start[pos:pos + len(counts)] = counts
            pos, total = pos + len(counts), int(counts[-1])
    if paths:
        try:
            os.makedirs(index_dir, exist_ok=True)
            for p, arr in zip(paths, (docs, start)):
                atomic_write(p, lambda f, arr=arr: np.save(f, arr), binary=True)
            atomic_json(marker, {"version": INDEX_VERSION, "key": key, "lengths": [len(docs), len(start)],
                                 "samples": int(start[-1])})
            loaded = _load_index(paths, marker)
            if loaded is not None:
                return loaded
        except OSError:  # a read-only shard folder: keep the index in memory
            pass
    return docs, start


class ShardSampleSet:
    """One domain split over shards; the `SampleSet` interface (`len`, `rows`, `input_ids[i]`, ...)."""

    def __init__(self, prefixes: Sequence[str], seq_len: int, pad_id: int, shard_hashes: Sequence[str],
                 index_dir: Optional[str] = None, limit: Optional[int] = None, source: Optional[dict] = None,
                 token_mask: Optional[str] = None):
        self.prefixes, self.seq_len, self.pad_id = list(prefixes), int(seq_len), int(pad_id)
        from dataflex.data.shards import open_shard, verify_shards
        verify_shards(self.prefixes, shard_hashes)           # sha256 on first use, memoised by size and mtime
        self.datasets = [open_shard(p, open_indexed) for p in self.prefixes]
        self.key = index_key(self.seq_len, shard_hashes)
        self.doc_shard, self.sample_start = build_or_load_index(self.datasets, self.seq_len, index_dir, self.key)
        self.index_dir = index_dir
        total = int(self.sample_start[-1])
        self.size = total if limit is None else min(total, int(limit))
        self.source = source or {}          # where the shards came from (for describe / where.py)
        self.input_ids, self.labels, self.loss_mask = (_RowView(self, i) for i in range(3))
        self.token_mask = self._open_mask(token_mask) if token_mask else None

    def _open_mask(self, path: str) -> np.ndarray:
        """Supervised records' trained-token bytes (one a token, the shards' order), memory-mapped; each
        shard's first token's place in it."""
        lengths = [np.asarray(ds.sequence_lengths, dtype=np.int64) for ds in self.datasets]
        total = int(sum(x.sum() for x in lengths))
        if not os.path.isfile(path) or os.path.getsize(path) != total:
            raise ShardError(f"{path}: the token mask of supervised records is missing or does not hold one byte "
                             f"for each of the shards' {total} tokens: delete the data cache folder to rebuild it")
        self._doc_start = []           # per shard: each document's first token in the mask
        base = 0
        for x in lengths:
            self._doc_start.append(base + np.concatenate([[0], np.cumsum(x)[:-1]]) if len(x) else x)
            base += int(x.sum())
        return np.memmap(path, dtype=np.uint8, mode="r") if total else np.zeros(0, dtype=np.uint8)

    def _trained(self, s: int, j: int, start: int, n: int) -> np.ndarray:
        """Whether labels start+1 .. start+n of document j of shard s are trained."""
        first = int(self._doc_start[s][j]) + start + 1
        return np.asarray(self.token_mask[first:first + n], dtype=bool)

    def __len__(self) -> int:
        return self.size

    @property
    def num_documents(self) -> int:
        return int(self.doc_shard[-1])

    def locate(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard number, sequence index in that shard, chunk) of local sample ids."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.size):
            raise IndexError(f"sample ids out of range [0, {self.size})")
        doc = np.searchsorted(self.sample_start, ids, side="right") - 1
        shard = np.searchsorted(self.doc_shard, doc, side="right") - 1
        return shard, doc - np.asarray(self.doc_shard)[shard], ids - np.asarray(self.sample_start)[doc]

    def documents(self, ids) -> np.ndarray:
        """Position of each sample's document in the concatenation of the shards."""
        return np.searchsorted(self.sample_start, np.asarray(ids, dtype=np.int64), side="right") - 1

    def lengths(self, ids) -> np.ndarray:
        """Label tokens of each local sample (the slots it takes in a packed row): min(T, n - 1 - chunk * T)
        for chunk `chunk` of a document of n tokens, from the shards' sequence lengths alone."""
        shard, j, c = self.locate(np.atleast_1d(np.asarray(ids, dtype=np.int64)))
        out = np.empty(len(shard), dtype=np.int64)
        for s in np.unique(shard).tolist():
            where = shard == s
            out[where] = np.asarray(self.datasets[s].sequence_lengths)[j[where]]
        return np.minimum(self.seq_len, out - 1 - c * self.seq_len)

    def tokens(self, ids, lengths) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `lengths[i]` slots of each local sample, concatenated (input ids, labels, loss mask): only
        those tokens are read."""
        T, parts, masks = self.seq_len, [], []
        for (s, j, c), n in zip(zip(*self.locate(np.atleast_1d(np.asarray(ids, dtype=np.int64)))), lengths):
            parts.append(self.datasets[s].get(int(j), offset=int(c) * T, length=int(n) + 1).astype(np.int64))
            if self.token_mask is not None:
                masks.append(self._trained(int(s), int(j), int(c) * T, int(n)))
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return empty, empty, empty.bool()
        inputs = np.concatenate([q[:-1] for q in parts])
        labels = np.concatenate([q[1:] for q in parts])
        mask = torch.from_numpy(np.concatenate(masks)) if masks else torch.ones(len(inputs), dtype=torch.bool)
        return torch.from_numpy(inputs), torch.from_numpy(labels), mask

    def rows(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """input_ids, labels ([B, T] long) and loss_mask ([B, T] bool) of local sample ids."""
        ids = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        T = self.seq_len
        inputs = np.full((len(ids), T), self.pad_id, dtype=np.int64)
        labels = np.full((len(ids), T), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(ids), T), dtype=bool)
        for r, (s, j, c) in enumerate(zip(*self.locate(ids))):
            ds = self.datasets[s]
            length = int(ds.sequence_lengths[j])
            piece = ds.get(int(j), offset=int(c) * T, length=min(T + 1, length - int(c) * T))
            n = len(piece) - 1
            inputs[r, :n], labels[r, :n] = piece[:-1], piece[1:]
            mask[r, :n] = True if self.token_mask is None else self._trained(int(s), int(j), int(c) * T, n)
        return torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(mask)


class _RowView:
    """`set.input_ids[i]` / `[ids]` / `[a:b]` reads those rows only (no [N, T] tensor is ever built)."""

    def __init__(self, owner, which: int):
        self.owner, self.which = owner, which

    @property
    def shape(self) -> tuple:
        return (len(self.owner), self.owner.seq_len)

    def __len__(self) -> int:
        return len(self.owner)

    def __getitem__(self, key):
        if isinstance(key, slice):
            ids = np.arange(len(self.owner))[key]
        else:
            ids = torch.as_tensor(key).numpy() if not isinstance(key, np.ndarray) else key
        out = self.owner.rows(np.atleast_1d(ids))[self.which]
        return out[0] if np.ndim(ids) == 0 else out


VERIFIED = ".verified.json"


def shard_prefixes_inside(base: str, prefixes, where: str) -> list[str]:
    """A manifest's shard prefixes resolved relative to its folder ``base``; one that is absolute or leads
    out of it (``..``, a symlink) is refused before any shard is opened or written beside."""
    from dataprep.safety import relative_inside

    out = []
    for p in prefixes:
        relative_inside(p, base, f"{where}: shard", ShardError)
        for ext in (".bin", ".idx"):     # each file too: a symlinked .bin would lead out as well
            if os.path.lexists(os.path.join(base, p + ext)):
                relative_inside(p + ext, base, f"{where}: shard", ShardError)
        out.append(os.path.join(base, p))
    return out


def verify_shards(prefixes, hashes) -> None:
    """sha256 of each shard's .bin against the recorded one, once per (path, size, mtime): a shard whose
    bytes changed or that was truncated stops the run, named. The memo lives beside the shards."""
    from dataprep.writer import sha256_file

    memos: dict = {}
    for prefix, want in zip(prefixes, hashes):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ShardError(f"shard {prefix + ext}: missing (the manifest or data cache lists it)")
        path = prefix + ".bin"
        if not want:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        memo_path = os.path.join(folder, VERIFIED)
        if folder not in memos:
            try:
                with open(memo_path) as f:
                    memos[folder] = json.load(f)
            except (OSError, ValueError):
                memos[folder] = {}
        memo = memos[folder]
        st = os.stat(path)
        stamp = f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}"
        if memo.get(stamp) == want:
            continue
        got = sha256_file(path)
        if got != want:
            raise ShardError(f"shard {path}: its sha256 {got[:16]}... differs from the recorded {want[:16]}... "
                             f"({st.st_size} bytes now): the file was changed or truncated after it was written; "
                             "rebuild it (rerun launch/prep.py, or delete the data cache folder)")
        memo[stamp] = want
        try:
            atomic_json(memo_path, memo)
        except OSError:   # a read-only shard folder: verified again next time
            pass


def open_shard(prefix: str, opener):
    """`opener(prefix)` (megatron's IndexedDataset), a damaged shard named instead of a bare error."""
    try:
        return opener(prefix)
    except (AssertionError, ValueError, OSError, IndexError) as e:
        raise ShardError(f"shard {prefix}.bin/.idx: cannot be read ({type(e).__name__}: {e}); the file is "
                         "truncated or damaged: rebuild it") from None
