"""Reading prepared data back: the hooks training uses.

* ``load_prepared(manifest_path)`` -> ``{domain: {"train": [(doc_id, tokens), ...], "val": [...]}}`` with
  tokens exactly as stored (dtype and EOS included), read through megatron-core's ``IndexedDataset``
  and copied into memory (every configured domain and split is present, possibly as an empty list).
* ``tokenizer_path(manifest_path)`` -> the tokenizer file the shards were made with (the copy kept next
  to the manifest).
* ``read_manifest`` / ``provenance_table`` for tools such as ``launch/where.py``.
"""
from __future__ import annotations

import json
import os

import numpy as np

from dataprep.safety import relative_inside


def _in_folder(manifest_path: str, rel, what: str) -> str:
    """A file a manifest names, relative to the manifest's folder and refused if it leads out of it."""
    base = os.path.dirname(os.path.abspath(manifest_path))
    relative_inside(rel, base, f"{manifest_path}: {what}")
    return os.path.join(base, rel)


def read_manifest(manifest_path: str) -> dict:
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"manifest not found: {manifest_path!r} (a run that did not finish writes none)")
    with open(manifest_path, encoding="utf-8") as f:
        return json.load(f)


def tokenizer_path(manifest_path: str) -> str:
    m = read_manifest(manifest_path)
    return _in_folder(manifest_path, m["tokenizer"]["path"], "tokenizer")


def provenance_table(manifest_path: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    m = read_manifest(manifest_path)
    return pq.read_table(_in_folder(manifest_path, m["provenance"]["path"], "provenance"), columns=columns)


def load_prepared(manifest_path: str) -> dict[str, dict[str, list[tuple[str, np.ndarray]]]]:
    from dataprep.megatron_io import indexed_dataset
    IndexedDataset = indexed_dataset()[0]

    m = read_manifest(manifest_path)
    prov = provenance_table(manifest_path, ["doc_id", "shard", "index"]).to_pydict()
    ids_by_shard: dict[str, list[str]] = {}
    for doc_id, shard in zip(prov["doc_id"], prov["shard"]):
        ids_by_shard.setdefault(shard, []).append(doc_id)
    out: dict[str, dict[str, list]] = {d: {s: [] for s in v["splits"]} for d, v in m["domains"].items()}
    for sh in m["shards"]:
        ds = IndexedDataset(_in_folder(manifest_path, sh["prefix"], "shard"))
        ids = ids_by_shard.get(sh["prefix"], [])
        if len(ds) != len(ids) or len(ids) != sh["documents"]:
            raise ValueError(f"{sh['prefix']}: shard holds {len(ds)} sequences, provenance lists {len(ids)}, "
                             f"manifest says {sh['documents']}")
        bucket = out.setdefault(sh["domain"], {}).setdefault(sh["split"], [])
        for i, doc_id in enumerate(ids):
            # copy: the dataset's __del__ closes its memory map, which would leave views dangling
            bucket.append((doc_id, np.array(ds[i])))
        del ds
    return out
