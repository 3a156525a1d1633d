"""Domains from a data config: raw JSONL / plain text files or dataprep shards -> token samples.

A data config holds `domains: {NAME: {train: PATH, val: PATH}}`, optional `target: {val: PATH}`,
`tokenizer: PATH` (default: the embedded corpus's), or `manifest: PATH` to train on dataprep's shards. A PATH is a file, a folder,
a glob, or a list of them, read by dataprep's readers: JSONL (also .gz/.zst) records need a string
`text` field; Parquet (`text` column); a saved HF `datasets` folder; a plain text file holds one
document per block of lines separated by a blank line. Each document (with an end-of-text token
appended) is cut into samples of `seq_len` labels; the last one is padded and masked.
"""
from __future__ import annotations

import glob
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from dataprep.readers import InputError, Source, expand_entry, read_source

from .tokenizer import Tokenizer, load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = "data/default/tokenizer.json"   # the embedded corpus's byte-level BPE


def resolve(path) -> str:
    """A relative path is taken from the working directory, else from the dataflex checkout
    (so the embedded corpus is found wherever a run starts)."""
    p = Path(str(path))
    if p.is_absolute() or _exists(p) or not _exists(REPO_ROOT / p):
        return str(p)
    return str(REPO_ROOT / p)


def _exists(p: Path) -> bool:
    return p.exists() or bool(glob.glob(str(p)))


class DataConfigError(ValueError):
    pass


MALFORMED = {"bad_json": "malformed JSON", "bad_utf8": "not valid UTF-8", "not_an_object": "record is not a JSON object",
             "missing_text": "record has no string 'text' field", "non_string_text": "record has no string 'text' field"}


def expand_paths(spec, key: str) -> list[Source]:
    """A config entry (a path, folder, glob or a list of them) as input sources, dataprep's readers'."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    try:
        return [src for s in specs for src in expand_entry(resolve(s), key)]
    except InputError as e:
        raise DataConfigError(str(e)) from None


def read_documents(src: Source, key: str = "data") -> Iterator[tuple[str, str]]:
    """(doc_id, text) pairs; doc_id is `path:line` (`path:row` for Parquet and datasets). Training is
    strict where dataprep is forgiving: a malformed record stops the run, naming file and line."""
    for record in read_source(src):
        if record.reason == "empty_text":
            continue
        if record.reason:
            raise DataConfigError(f"{src.path}:{record.line}: {MALFORMED.get(record.reason, record.reason)} ({key})")
        yield f"{src.path}:{record.line}", record.text


@dataclass
class SampleSet:
    """One domain split as fixed-length samples, with the document each sample came from."""
    input_ids: torch.Tensor          # [N, T] long
    labels: torch.Tensor             # [N, T] long
    loss_mask: torch.Tensor          # [N, T] bool
    doc_ids: list = field(default_factory=list)
    chunks: list = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


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


@dataclass
class Domains:
    tokenizer: Tokenizer
    train: dict          # name -> SampleSet
    val: dict            # name -> SampleSet (domains without a val split are absent)
    target: Optional[SampleSet] = None


def load_domains(data_cfg, seq_len: int, max_val_samples: Optional[int] = None) -> Domains:
    """Read a data config (a dict or OmegaConf node) into tokenized samples per domain."""
    data = dict(data_cfg)
    known = {"domains", "target", "tokenizer", "manifest"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataConfigError(f"data: unknown key(s) {unknown}; a data config holds {sorted(known)}")
    if data.get("manifest"):
        return _load_manifest(data, seq_len, max_val_samples)
    if not data.get("domains"):
        raise DataConfigError("data.domains: no domains given (domains: {NAME: {train: PATH, val: PATH}})")
    tokenizer = load_tokenizer(resolve(data.get("tokenizer") or DEFAULT_TOKENIZER))
    train, val = {}, {}
    for name, entry in data["domains"].items():
        entry = dict(entry) if not isinstance(entry, str) else {"train": entry}
        bad = sorted(set(entry) - {"train", "val"})
        if bad:
            raise DataConfigError(f"data.domains.{name}: unknown key(s) {bad}; expected train and val")
        if "train" not in entry:
            raise DataConfigError(f"data.domains.{name}.train: missing")
        train[name] = build_samples(entry["train"], tokenizer, seq_len, f"data.domains.{name}.train")
        if entry.get("val"):
            val[name] = build_samples(entry["val"], tokenizer, seq_len, f"data.domains.{name}.val", max_val_samples)
    target = None
    if data.get("target"):
        target = build_samples(dict(data["target"])["val"], tokenizer, seq_len, "data.target.val", max_val_samples)
    return Domains(tokenizer, train, val, target)


def _load_manifest(data: dict, seq_len: int, max_val_samples: Optional[int]) -> Domains:
    from dataprep.manifest import load_prepared, tokenizer_path

    path = data["manifest"]
    if not Path(path).is_file():
        raise DataConfigError(f"data.manifest: file not found: {path}")
    tokenizer = load_tokenizer(data.get("tokenizer") or tokenizer_path(path))
    prepared = load_prepared(path)
    train, val = {}, {}
    for name, splits in prepared.items():
        docs = [(doc_id, tokens.tolist()) for doc_id, tokens in splits.get("train", [])]
        train[name] = chunk_documents(docs, seq_len, tokenizer.eos_id)
        if len(train[name]) == 0:
            raise DataConfigError(f"{path}: domain {name!r} has no training documents")
        if splits.get("val"):
            vdocs = [(doc_id, tokens.tolist()) for doc_id, tokens in splits["val"]]
            val[name] = take(chunk_documents(vdocs, seq_len, tokenizer.eos_id), max_val_samples)
    return Domains(tokenizer, train, val)


class MixtureDataset:
    """All domains' samples in one table; global id = domain offset + index within the domain."""

    def __init__(self, sets: dict):
        self.names = list(sets)
        self.sizes = [len(s) for s in sets.values()]
        self.input_ids = torch.cat([s.input_ids for s in sets.values()])
        self.labels = torch.cat([s.labels for s in sets.values()])
        self.loss_mask = torch.cat([s.loss_mask for s in sets.values()])
        self.domain = torch.cat([torch.full((len(s),), d, dtype=torch.long) for d, s in enumerate(sets.values())])
        self.doc_ids = [i for s in sets.values() for i in s.doc_ids]
        self.chunks = [c for s in sets.values() for c in s.chunks]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, ids: torch.Tensor) -> dict:
        ids = torch.as_tensor(ids, dtype=torch.long)
        B, T = len(ids), self.input_ids.shape[1]
        return {
            "input_ids": self.input_ids[ids],
            "labels": self.labels[ids],
            "loss_mask": self.loss_mask[ids].float(),
            "position_ids": torch.arange(T).expand(B, T).contiguous(),
            "sample_id": ids,
            "domain": self.domain[ids],
        }

    def sample_table(self, split: str = "train") -> dict:
        """Columns for samples.parquet: where every sample id came from."""
        return {"sample_id": list(range(len(self))), "domain": [self.names[d] for d in self.domain.tolist()],
                "split": [split] * len(self), "doc_id": self.doc_ids, "chunk": self.chunks}
