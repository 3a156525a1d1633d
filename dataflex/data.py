"""Domains from a data config: raw JSONL / plain text files or dataprep shards -> token samples.

A data config holds `domains: {NAME: {train: PATH, val: PATH}}`, optional `target: {val: PATH}` (or target
subtasks, `target: {NAME: {val: PATH}, ...}`), `tokenizer: PATH` (default: the embedded corpus's), or
`manifest: PATH` to train on dataprep's shards; `build: {_target_: FUNCTION, ...}` is called first with the
other keys, to make data that is built on first use (`configs/data/bench.yaml`). A PATH is a file, a folder,
a glob, or a list of them, read by dataprep's readers: JSONL (also .gz/.zst) records need a string
`text` field; Parquet (`text` column); a saved HF `datasets` folder; a plain text file holds one
document per block of lines separated by a blank line. Each document (with an end-of-text token
appended) is cut into samples of `seq_len` labels; the last one is padded and masked.

Training never holds the corpus in memory: raw files are tokenized once into a cache of Megatron shards
(`dataflex.data_cache`), a manifest's shards are used where they are, and both are read memory-mapped
through megatron-core's `IndexedDataset` with a cached sample index (`dataflex.shards`).
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch

from dataprep.readers import InputError, Source, expand_entry, read_source

from .checks import load_tokenizer_checked
from .data_cache import ensure_cache
from .mixture import DomainIndex, MixtureDataset  # noqa: F401  (the mixture lived here; imports keep working)
from .shards import ShardSampleSet
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
    try:
        records = read_source(src)      # a binary file is refused here, by its content
    except InputError as e:
        raise DataConfigError(f"{e} ({key})") from None
    for record in records:
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

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, ids):
        ids = torch.as_tensor(ids, dtype=torch.long)
        return self.input_ids[ids], self.labels[ids], self.loss_mask[ids]


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
    train: dict          # name -> ShardSampleSet (memory-mapped; a SampleSet when built in memory)
    val: dict            # name -> ShardSampleSet (domains without a val split are absent)
    target: Optional[ShardSampleSet] = None    # {subtask: ShardSampleSet} for a target with subtasks


def _groups(data: dict) -> list[dict]:
    """Every (domain, split) of a raw-file data config with its expanded inputs; config errors first."""
    groups = []
    for name, entry in data["domains"].items():
        entry = dict(entry) if not isinstance(entry, str) else {"train": entry}
        bad = sorted(set(entry) - {"train", "val", "kind"})
        if bad:
            raise DataConfigError(f"data.domains.{name}: unknown key(s) {bad}; expected train, val and kind")
        if "train" not in entry:
            raise DataConfigError(f"data.domains.{name}.train: missing")
        for split in ("train", "val"):
            if entry.get(split):
                key = f"data.domains.{name}.{split}"
                groups.append({"name": name, "split": split, "key": key, "spec": entry[split],
                               "sources": [(s.path, s.fmt) for s in expand_paths(entry[split], key)]})
    seen = {}      # the same file in two domains would train on it twice, under two names
    for g in groups:
        for path, _ in g["sources"]:
            real = os.path.realpath(path)
            other = seen.setdefault(real, g)
            if other["name"] != g["name"]:
                raise DataConfigError(f"{path}: in two domains ({other['key']} and {g['key']}); a file belongs to "
                                      "one domain")
    return groups + _target_groups(data)


def _target_groups(data: dict) -> list[dict]:
    """The target set's groups: `_target` for `target: {val: PATH}`, `_target.NAME` for each subtask."""
    target = dict(data.get("target") or {})
    subtasks = {"": target} if "val" in target else {str(k): dict(v) for k, v in target.items()}
    groups = []
    for name, entry in subtasks.items():
        key = f"data.target.{name + '.' if name else ''}val"
        if "val" not in entry:
            raise DataConfigError(f"{key}: missing (target: {{val: PATH}} or target: {{SUBTASK: {{val: PATH}}}})")
        groups.append({"name": f"_target.{name}" if name else "_target", "split": "val", "key": key,
                       "spec": entry["val"], "sources": [(s.path, s.fmt) for s in expand_paths(entry["val"], key)]})
    return groups


def _run_build(data: dict) -> dict:
    """`build: {_target_: FUNCTION, **kwargs}`: FUNCTION(**kwargs) makes the data on first use."""
    from hydra.utils import get_method

    spec = dict(data.pop("build"))
    get_method(spec.pop("_target_"))(**spec)
    return data


def _is_builder() -> bool:
    """Local rank 0 builds a cache; the other ranks of the node wait for it."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) == 0


def load_domains(data_cfg, seq_len: int, max_val_samples: Optional[int] = None,
                 progress: Optional[bool] = None) -> Domains:
    """Read a data config (a dict or OmegaConf node) into memory-mapped samples per domain.

    Raw files are tokenized into the cache on the first launch (`data.cache`, else `$DATAFLEX_CACHE`,
    else `~/.cache/dataflex/data`) and reused afterwards; a manifest's shards are read in place."""
    data = dict(data_cfg)
    known = {"domains", "target", "tokenizer", "manifest", "cache", "exclude", "build"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataConfigError(f"data: unknown key(s) {unknown}; a data config holds {sorted(known)}")
    if data.get("build"):
        data = _run_build(data)
    if data.get("manifest"):
        domains = _load_manifest(data, seq_len, max_val_samples)
        if data.get("target"):     # raw target files, tokenized into the data cache with the manifest's tokenizer
            domains.target = _load_groups(data, _target_groups(data), domains.tokenizer, seq_len, None)[2]
        return domains
    if not data.get("domains"):
        raise DataConfigError("data.domains: no domains given (domains: {NAME: {train: PATH, val: PATH}})")
    if data.get("exclude"):   # leave domains of a shared data config out
        from dataprep.config import select_domains

        data["domains"] = select_domains(dict(data["domains"]), {"exclude": data["exclude"]}, "data.domains",
                                         DataConfigError)
    tokenizer = load_tokenizer_checked(resolve(data.get("tokenizer") or DEFAULT_TOKENIZER))
    train, val, target = _load_groups(data, _groups(data), tokenizer, seq_len, max_val_samples, progress)
    return Domains(tokenizer, train, val, target)


def _load_groups(data: dict, groups: list, tokenizer, seq_len: int, max_val_samples, progress: Optional[bool] = None):
    progress = _is_builder() if progress is None else progress
    folder, cache, _ = ensure_cache(groups, tokenizer, data.get("cache"), builder=_is_builder(), progress=progress)
    train, val, target, subtasks = {}, {}, None, {}
    for g, rec in zip(groups, cache["groups"]):
        limit = max_val_samples if g["split"] == "val" else None
        source = {"kind": "cache", "base": folder, "group": rec, "split": g["split"]}
        samples = ShardSampleSet([os.path.join(folder, s["prefix"]) for s in rec["shards"]], seq_len,
                                 tokenizer.eos_id, [s["bin"]["sha256"] for s in rec["shards"]],
                                 os.path.join(folder, "index"), limit, source)
        if len(samples) == 0:
            raise DataConfigError(f"{g['key']}: no documents with at least two tokens in {g['spec']}")
        if g["name"] == "_target":
            target = samples
        elif g["name"].startswith("_target."):
            subtasks[g["name"].split(".", 1)[1]] = samples
        else:
            (train if g["split"] == "train" else val)[g["name"]] = samples
    return train, val, target or subtasks or None


def _load_manifest(data: dict, seq_len: int, max_val_samples: Optional[int]) -> Domains:
    from dataprep.manifest import read_manifest, tokenizer_path

    path = data["manifest"]
    if not Path(path).is_file():
        raise DataConfigError(f"data.manifest: file not found: {path}")
    m = read_manifest(path)
    base = os.path.dirname(os.path.abspath(path))
    tokenizer = load_tokenizer_checked(data.get("tokenizer") or tokenizer_path(path))
    train, val = {}, {}
    from dataprep.config import select_domains

    for name, dom in select_domains(m["domains"], data, path, DataConfigError).items():
        for split in dom["splits"]:
            shards = [s for s in m["shards"] if s["domain"] == name and s["split"] == split]
            limit = max_val_samples if split == "val" else None
            source = {"kind": "manifest", "base": base, "manifest": os.path.abspath(path), "split": split,
                      "shards": [s["prefix"] for s in shards]}
            samples = ShardSampleSet([os.path.join(base, s["prefix"]) for s in shards], seq_len, tokenizer.eos_id,
                                     [s["bin"]["sha256"] for s in shards], os.path.join(base, "index"), limit,
                                     source)
            if split == "train":
                if len(samples) == 0:
                    raise DataConfigError(f"{path}: domain {name!r} has no training documents (prep dropped "
                                          f"them all); leave it out with `exclude: [{name}]` in the data config")
                train[name] = samples
            elif len(samples):
                val[name] = samples
    return Domains(tokenizer, train, val)
