"""Where a training sample came from, resolved on demand (nothing is listed per sample at start-up).

A sample id maps to (domain, index in the domain) by the domain sizes, then to (shard, sequence, chunk)
by the sample index, then to its document's row in a provenance table: the cache's per-group
``provenance.parquet`` for raw files (``doc_id`` = ``file:line``), dataprep's ``provenance.parquet`` for
a manifest. `launch/where.py` does it from ``RUN_DIR/data.json`` (the run's `MixtureDataset.describe()`).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from dataflex.data.mixture import MixtureDataset
from dataflex.data.shards import ShardSampleSet
from dataprep.manifest import provenance_table, read_manifest

PROV_COLUMNS = ["doc_id", "source", "line", "line_kind", "shard", "index", "tokens"]


def _cache_rows(source: dict, shard_no: np.ndarray, seq: np.ndarray, docs: np.ndarray) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rec = source["group"]
    table = pq.read_table(os.path.join(source["base"], rec["provenance"]), columns=PROV_COLUMNS)
    rows = table.take(pa.array(docs, pa.int64())).to_pylist()
    for r, s in zip(rows, shard_no.tolist()):
        r["shard"] = rec["shards"][s]["prefix"]          # relative to the cache folder
    return rows


def _manifest_rows(source: dict, shard_no: np.ndarray, seq: np.ndarray, docs: np.ndarray) -> list[dict]:
    import pyarrow as pa
    import pyarrow.compute as pc


    prov = provenance_table(source["manifest"], PROV_COLUMNS)
    prefixes = [source["shards"][s] for s in shard_no.tolist()]
    prov = prov.filter(pc.is_in(prov["shard"], value_set=pa.array(sorted(set(prefixes)))))
    where = {(s, i): n for n, (s, i) in enumerate(zip(prov["shard"].to_pylist(), prov["index"].to_pylist()))}
    out = []
    for p, i in zip(prefixes, seq.tolist()):
        if (p, i) not in where:
            raise KeyError(f"shard {p} sequence {i} not in the provenance of {source['manifest']}")
        out.append(prov.slice(where[(p, i)], 1).to_pylist()[0])
    return out


def _doc_rows(s, local: np.ndarray) -> tuple[list[dict], np.ndarray]:
    """Provenance rows and chunk numbers of local sample ids of one domain set."""
    source = getattr(s, "source", None)
    if not source:  # an in-memory SampleSet
        return [{"doc_id": s.doc_ids[i] if s.doc_ids else None} for i in local.tolist()], \
            np.array([s.chunks[i] if s.chunks else 0 for i in local.tolist()], dtype=np.int64)
    shard_no, seq, chunk = s.locate(local)
    rows = (_cache_rows if source["kind"] == "cache" else _manifest_rows)(source, shard_no, seq, s.documents(local))
    return rows, chunk


def resolve_samples(mixture, ids: torch.Tensor, split: str = "train", full: bool = False) -> dict:
    """Columns `sample_id, domain, split, doc_id, chunk` for global ids (with `full`: the provenance row too)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    d, local = mixture.locate(ids)
    rows: list = [None] * len(ids)
    chunks = np.zeros(len(ids), dtype=np.int64)
    for k in torch.unique(d).tolist():
        pos = torch.nonzero(d == k).flatten().numpy()
        r, c = _doc_rows(mixture.sets[k], local[pos].numpy())
        for p, row in zip(pos.tolist(), r):
            rows[p] = row
        chunks[pos] = c
    table = {"sample_id": ids.tolist(), "domain": [mixture.names[k] for k in d.tolist()], "split": [split] * len(ids),
             "doc_id": [r["doc_id"] for r in rows], "chunk": chunks.tolist()}
    if full:
        table["rows"] = rows
    return table


def sample_table(mixture: MixtureDataset, ids=None, split: str = "train") -> dict:
    """Columns of samples.parquet for `ids` (default all, O(N)): domain, doc_id (`file:line` or
    dataprep's document id) and chunk of each sample."""
    ids = torch.arange(len(mixture)) if ids is None else torch.as_tensor(ids, dtype=torch.long)
    return resolve_samples(mixture, ids, split)


def open_run_data(run_dir: str):
    """The training `MixtureDataset` of a run, reopened from RUN_DIR/data.json (memory-mapped)."""

    path = os.path.join(run_dir, "data.json")
    with open(path) as f:
        info = json.load(f)
    sets = {}
    for name, size, src in zip(info["names"], info["sizes"], info["domains"]):
        if not src:
            raise ValueError(f"{path}: domain {name!r} was given in memory; its samples cannot be traced")
        if src["kind"] == "cache":
            prefixes = [os.path.join(src["base"], s["prefix"]) for s in src["group"]["shards"]]
            hashes = [s["bin"]["sha256"] for s in src["group"]["shards"]]
            index_dir = os.path.join(src["base"], "index")
        else:

            by_prefix = {s["prefix"]: s for s in read_manifest(src["manifest"])["shards"]}
            prefixes = [os.path.join(src["base"], p) for p in src["shards"]]
            hashes = [by_prefix[p]["bin"]["sha256"] for p in src["shards"]]
            index_dir = os.path.join(src["base"], "index")
        sets[name] = ShardSampleSet(prefixes, info["seq_len"], 0, hashes, index_dir, size, src)
    return MixtureDataset(sets), info


def where_sample(run_dir: str, sample_id: int, manifest_path: Optional[str] = None) -> dict:
    """What `launch/where.py` prints: source file and line (or row), domain, split, shard, index, chunk."""
    data, info = open_run_data(run_dir)
    if not 0 <= sample_id < len(data):
        raise KeyError(f"sample_id {sample_id} not in this run (its training data has {len(data)} samples)")
    t = resolve_samples(data, torch.tensor([sample_id]), full=True)
    row, k = t["rows"][0], data.names.index(t["domain"][0])
    src = info["domains"][k]
    local = int(data.locate(torch.tensor([sample_id]))[1][0])
    _, seq, _ = data.sets[k].locate(np.array([local]))
    out = {"sample_id": sample_id, "chunk": t["chunk"][0], "doc_id": row["doc_id"], "domain": t["domain"][0],
           "split": src["split"], "source": row["source"], row["line_kind"]: row["line"], "shard": row["shard"],
           "index_in_shard": int(seq[0]), "tokens": row["tokens"]}
    if src["kind"] == "cache":
        out["cache"] = src["base"]
    else:
        out["manifest"] = manifest_path or src["manifest"]
    return out


def find_manifest(run_dir: str) -> str:
    """``data.manifest`` from ``RUN_DIR/config.yaml`` (relative paths: the current directory first, then
    the run directory)."""
    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: pass --manifest PATH")
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(cfg_path)
    path = OmegaConf.select(cfg, "data.manifest", default=None)
    if not path:
        raise ValueError(f"{cfg_path}: key data.manifest is not set (the run did not train on prepared data); "
                         f"pass --manifest PATH")
    path = str(path)
    if not os.path.isabs(path) and not os.path.exists(path) and os.path.exists(os.path.join(run_dir, path)):
        path = os.path.join(run_dir, path)
    return path


def sample_row(run_dir: str, sample_id: int) -> dict:
    """A training sample's row of RUN_DIR/samples.parquet (sample_id, domain, split, doc_id, chunk)."""
    path = os.path.join(run_dir, "samples.parquet")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (training writes it)")
    table = pq.read_table(path)
    rows = table.filter(pc.equal(table["sample_id"], sample_id)).to_pylist()
    if not rows:
        raise KeyError(f"sample_id {sample_id} not in {path}")
    return rows[0]


def where(run_dir: str, sample_id: int, manifest_path: str | None = None) -> dict:
    if os.path.isfile(os.path.join(run_dir, "data.json")):

        return where_sample(run_dir, sample_id, manifest_path)
    sample = sample_row(run_dir, sample_id)
    manifest_path = manifest_path or find_manifest(run_dir)
    m = read_manifest(manifest_path)
    prov = provenance_table(manifest_path)
    hit = prov.filter(pc.equal(prov["doc_id"], sample["doc_id"])).to_pylist()
    if not hit:
        raise KeyError(f"doc_id {sample['doc_id']!r} (sample {sample_id}) not in the provenance of {manifest_path}")
    p = hit[0]
    return {"sample_id": sample_id, "chunk": sample.get("chunk"), "doc_id": p["doc_id"], "domain": p["domain"],
            "split": p["split"], "source": p["source"], p["line_kind"]: p["line"], "shard": p["shard"],
            "index_in_shard": p["index"], "tokens": p["tokens"], "manifest": manifest_path,
            "config_sha256": m.get("config_sha256")}
