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
(`dataflex.data.cache`), a manifest's shards are used where they are, and both are read memory-mapped
through megatron-core's `IndexedDataset` with a cached sample index (`dataflex.data.shards`).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dataflex.data.cache import ensure_cache
from dataflex.data.config import DEFAULT_TOKENIZER, _groups, _target_groups, resolve
from dataflex.data.mixture import DomainIndex, MixtureDataset  # noqa: F401  (the mixture lived here; imports keep working)
from dataflex.data.shards import ShardSampleSet, shard_prefixes_inside
from dataflex.data.tokenizer import load_tokenizer_checked
from dataflex.utils.errors import DataConfigError, ShardError
from dataflex.utils.files import disk_full
from dataprep.tokenizer import Tokenizer


@dataclass
class Domains:
    tokenizer: Tokenizer
    train: dict          # name -> ShardSampleSet (memory-mapped; a SampleSet when built in memory)
    val: dict            # name -> ShardSampleSet (domains without a val split are absent)
    target: Optional[ShardSampleSet] = None    # {subtask: ShardSampleSet} for a target with subtasks


def _run_build(data: dict) -> dict:
    """`build: {_target_: FUNCTION, **kwargs}`: FUNCTION(**kwargs) makes the data on first use."""
    spec = dict(data.pop("build"))
    target = str(spec.pop("_target_", ""))
    module, _, attr = target.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr) if module else None
    except (ImportError, AttributeError):
        fn = None
    if not callable(fn):
        raise DataConfigError(f"data.build._target_={target!r}: not an importable function (module.function)")
    fn(**spec)
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
    try:
        folder, cache, _ = ensure_cache(groups, tokenizer, data.get("cache"), builder=_is_builder(),
                                        progress=progress)
    except OSError as e:
        full = disk_full(e, getattr(e, "filename", None) or data.get("cache") or "data cache")
        if full is None:
            raise
        raise DataConfigError(f"{full}, while building the data cache: free space there, or set data.cache=DIR "
                              "on a disk with room (the cache holds every domain tokenized once)") from None
    train, val, target, subtasks = {}, {}, None, {}
    for g, rec in zip(groups, cache["groups"]):
        limit = max_val_samples if g["split"] == "val" else None
        source = {"kind": "cache", "base": folder, "group": rec, "split": g["split"]}
        samples = ShardSampleSet([os.path.join(folder, s["prefix"]) for s in rec["shards"]], seq_len,
                                 tokenizer.eos_id, [s["bin"]["sha256"] for s in rec["shards"]],
                                 os.path.join(folder, "index"), limit, source,
                                 os.path.join(folder, rec["loss_mask"]) if rec.get("loss_mask") else None)
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
    from dataprep.safety import PathEscape

    try:
        tokenizer = load_tokenizer_checked(data.get("tokenizer") or tokenizer_path(path))
    except PathEscape as e:
        raise ShardError(str(e)) from None
    train, val = {}, {}
    from dataprep.config import select_domains

    for name, dom in select_domains(m["domains"], data, path, DataConfigError).items():
        for split in dom["splits"]:
            shards = [s for s in m["shards"] if s["domain"] == name and s["split"] == split]
            limit = max_val_samples if split == "val" else None
            source = {"kind": "manifest", "base": base, "manifest": os.path.abspath(path), "split": split,
                      "shards": [s["prefix"] for s in shards]}
            prefixes = shard_prefixes_inside(base, [s["prefix"] for s in shards], path)
            samples = ShardSampleSet(prefixes, seq_len, tokenizer.eos_id,
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


def dataset_domain(data, seq_len: int, tokenizer=None, column: str = "text", split: Optional[str] = "train",
                   name: str = "dataset"):
    """One domain (a `SampleSet`) from Hugging Face `datasets`: a `Dataset`, a `DatasetDict` (its `split`),
    or the folder of either saved with `save_to_disk`. What its columns hold decides how it is read:

    - `input_ids` (a tokenized dataset): the token lists as they are, no re-tokenization, cut into samples
      of `seq_len` labels like documents (the last one padded and masked);
    - `prompt` and `completion` (strings, or lists of messages), or `messages`: one sample per record,
      truncated to `seq_len` labels, the loss on the completion's (the assistant's) tokens only, prompt tokens
      carrying loss-mask 0; messages are rendered with the chat template of `tokenizer`'s folder
      (dataflex.data.records);
    - otherwise the text column `column`: each record a document with end-of-text appended, tokenized
      with `tokenizer` and cut into samples exactly as a data config's files are.

    The samples are built in memory (this is for datasets that fit; a data config's saved-dataset folder
    goes through the memory-mapped token cache instead). Streaming (`IterableDataset`) is refused."""
    import datasets
    import torch

    from dataflex.data.samples import SampleSet, chunk_documents

    source = str(data) if isinstance(data, (str, Path)) else name
    if isinstance(data, (str, Path)):
        data = datasets.load_from_disk(str(data))
    if isinstance(data, (datasets.IterableDataset, datasets.IterableDatasetDict)):
        raise DataConfigError(f"{name}: a streaming dataset cannot be a domain (dataflex draws samples by id, in "
                              "any order, and resumes at an exact position): load it with "
                              "`load_dataset(..., streaming=False)`, or save it first "
                              "(`Dataset.from_generator(lambda: iter(stream)).save_to_disk(DIR)`)")
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise DataConfigError(f"{name}: the DatasetDict has splits {list(data)}, none named {split!r} (split=)")
        data = data[split]
    cols = data.column_names
    need_tokenizer = "input_ids" not in cols
    if need_tokenizer and tokenizer is None:
        raise DataConfigError(f"{name}: columns {cols} hold text: pass tokenizer= (dataflex.load_tokenizer(PATH))")
    pad = getattr(tokenizer, "eos_id", None) or 0
    if "input_ids" in cols:
        docs = ((f"{source}:{i}", ids) for i, ids in enumerate(data["input_ids"]))
        return chunk_documents(docs, seq_len, pad)
    kind = "prompt-completion" if "prompt" in cols and "completion" in cols else "chat" if "messages" in cols \
        else None
    if kind is not None:           # supervised records: dataflex.data.records (chat templates for messages)
        from dataflex.data.records import RecordTokenizer

        encode = RecordTokenizer(tokenizer, kind, name)
        inputs = torch.full((len(data), seq_len), pad, dtype=torch.long)
        labels, mask = inputs.clone(), torch.zeros(len(data), seq_len, dtype=torch.bool)
        for i, rec in enumerate(data):
            tokens, trained = encode(rec, f"{source}:{i}")
            tokens, trained = tokens[:seq_len + 1], trained[:seq_len + 1]
            n = len(tokens) - 1
            if n <= 0:
                continue
            inputs[i, :n], labels[i, :n] = torch.tensor(tokens[:-1]), torch.tensor(tokens[1:])
            mask[i, :n] = torch.tensor(trained[1:])         # label t is token t+1: the trained tokens only
        return SampleSet(inputs, labels, mask, [f"{source}:{i}" for i in range(len(data))], [0] * len(data))
    if column not in cols:
        raise DataConfigError(f"{name}: no column {column!r} (column=); columns: {cols}")
    rows = [(i, t) for i, t in enumerate(data[column]) if isinstance(t, str) and t.strip()]
    encoded = tokenizer.encode_batch([t for _, t in rows]) if rows else []
    docs = ((f"{source}:{i}", ids + [tokenizer.eos_id]) for (i, _), ids in zip(rows, encoded))
    return chunk_documents(docs, seq_len, pad)
