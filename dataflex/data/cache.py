"""Raw input files tokenized once into Megatron shards, cached and reused by later runs and every rank.

The cache folder ``ROOT/<key>/`` is keyed by the data config (the expanded inputs of every domain and
split), the tokenizer's sha256 and the inputs' sha256 (memoised by path, size and mtime in
``ROOT/input_hashes.json``, so a cached launch does not re-read the corpus). It holds, per group
(domain and split; the target set is the group ``_target/val``):

    GROUP/shards/*_NNNNN.{bin,idx}   dataprep's ShardWriter (megatron-core's IndexedDatasetBuilder)
    GROUP/provenance.parquet         doc_id (``file:line``), source, line, line_kind, tokens: one row a document
    GROUP/loss_mask.u8               supervised records only (`records:`): a byte a token, 1 where it is a
                                     trained label (completion / assistant tokens), in the shards' order
    GROUP/.done.json                 the group's shards with hashes; written last (a finished group)
    cache.json                       everything above; written last by atomic rename: the commit point

Every file here is written under a temporary name of its own (pid, thread, random), fsynced and renamed
(`atomic_write`), and the files a marker names are fsynced before the marker: a reader never sees a part.

Building holds ``ROOT/<key>.lock`` (flock), so two launches build once; other ranks of a launch wait for
``cache.json``. A build that fails (a full disk, a bad input, Ctrl-C) removes its unfinished group, so no
``.tmp`` file stays behind. A killed build leaves no ``cache.json``: the next launch keeps the finished groups, redoes
the unfinished one and writes the same bytes (the build is a pure function of the inputs).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Optional

from dataflex.utils.files import atomic_json, file_lock, fsync_dir

CACHE_VERSION = 1
MARKER = "cache.json"
MASK_FILE = "loss_mask.u8"     # a group of supervised records (data.records): which tokens are trained


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def default_root() -> str:
    return os.environ.get("DATAFLEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dataflex", "data")


def _sha256_path(path: str) -> str:
    from dataprep.writer import sha256_file

    if os.path.isdir(path):  # an HF datasets folder
        h = hashlib.sha256()
        for root, dirs, names in sorted(os.walk(path)):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                h.update(f"{os.path.relpath(p, path)}:{sha256_file(p)}\n".encode())
        return h.hexdigest()
    return sha256_file(path)


def input_hashes(paths: list[str], root: str) -> list[str]:
    """sha256 of every input, memoised by (path, size, mtime_ns)."""
    memo_path = os.path.join(root, "input_hashes.json")
    try:
        with open(memo_path) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    out, changed = [], False
    for p in paths:
        st = os.stat(p)
        stamp = f"{os.path.abspath(p)}|{st.st_size}|{st.st_mtime_ns}"
        if stamp not in memo or os.path.isdir(p):
            memo[stamp], changed = _sha256_path(p), True
        out.append(memo[stamp])
    if changed:
        try:
            os.makedirs(root, exist_ok=True)
            atomic_json(memo_path, memo)
        except OSError:
            pass
    return out


def cache_key(groups: list[dict], tokenizer_sha: str, hashes: list[str]) -> str:
    """Independent of seq_len: the shards hold whole documents; sample indexes are keyed by seq_len."""
    spec = {"v": CACHE_VERSION, "tokenizer": tokenizer_sha, "hashes": hashes,
            "groups": [{k: g[k] for k in ("name", "split", "key", "sources", "column", "hf_split", "records",
                                          "chat_template") if k in g}
                       for g in groups]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:24]


def _read_marker(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_cache(groups: list[dict], tokenizer, root: Optional[str] = None, builder: bool = True,
                 progress: bool = True) -> tuple[str, dict, bool]:
    """(folder, cache.json contents, whether this call built it). ``groups``: dicts with ``name``, ``split``,
    ``key`` (the config key, for error messages) and ``sources`` ([(path, fmt)]). A non-``builder``
    process (a rank other than local rank 0) only waits for the marker."""
    root = os.path.abspath(root or default_root())
    os.makedirs(root, exist_ok=True)
    paths = [p for g in groups for p, _ in g["sources"]]
    groups = [_with_template(g, tokenizer) for g in groups]
    key = cache_key(groups, tokenizer.sha256, input_hashes(paths, root))
    folder = os.path.join(root, key)
    done = _read_marker(folder)
    if done is not None:
        return folder, done, False
    if not builder:
        t0 = time.time()
        while (done := _read_marker(folder)) is None:
            if time.time() - t0 > 5:
                print(f"dataflex: waiting for the data cache {folder} (built by local rank 0)", file=sys.stderr)
                t0 = float("inf")
            time.sleep(0.2)
        return folder, done, False
    with file_lock(folder + ".lock"):
        done = _read_marker(folder)
        if done is not None:  # another process built it while we waited for the lock
            return folder, done, False
        done = _build(folder, groups, tokenizer, progress)
    return folder, done, True


def _with_template(g: dict, tokenizer) -> dict:
    """A group of supervised records keyed by the chat template that renders them too."""
    if g.get("records", "text") == "text":
        return g
    from dataflex.data.records import template_sha

    sha = template_sha(tokenizer, g["records"], g["key"])
    return {**g, "chat_template": sha} if sha else g


def _build(folder: str, groups: list[dict], tokenizer, progress: bool) -> dict:
    from tqdm import tqdm

    from dataprep.writer import token_dtype

    os.makedirs(folder, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    todo = [g for g in groups if _group_done(folder, g) is None]
    total = sum(os.path.getsize(p) for g in todo for p, _ in g["sources"] if os.path.isfile(p))
    bar = tqdm(total=total, unit="B", unit_scale=True, disable=not progress or not todo, file=sys.stderr,
               desc=f"dataflex: tokenizing {len(todo)} input group(s) once into {folder}")
    out_groups = []
    fault = int(os.environ.get("DATAFLEX_CACHE_FAULT", "0") or 0)   # tests: die after N documents
    written = [0]
    for g in groups:
        rec = _group_done(folder, g)
        if rec is None:
            try:
                rec = _build_group(folder, g, tokenizer, dtype, bar, fault, written)
            except BaseException as e:      # a full disk, a bad input, Ctrl-C: no half-written files stay behind
                if isinstance(e, OSError) and not e.filename:      # a write to an open file names none
                    e.filename = group_dir(folder, g)
                bar.close()
                _remove_partial(folder, group_dir(folder, g))
                raise
        out_groups.append(rec)
    bar.close()
    manifest = {"version": CACHE_VERSION, "tokenizer": tokenizer.describe(), "dtype": dtype, "groups": out_groups}
    atomic_json(os.path.join(folder, MARKER), manifest, indent=1, sort_keys=True)   # the commit point
    return manifest


def _remove_partial(folder: str, gdir: str) -> None:
    """An unfinished group's folder (its `.tmp` shards and provenance; the next build redoes the group from
    scratch anyway), then the folders above it up to the cache folder if that left them empty."""
    shutil.rmtree(gdir, ignore_errors=True)
    here = os.path.dirname(gdir)
    while len(here) >= len(folder):
        try:
            os.rmdir(here)
        except OSError:
            break
        here = os.path.dirname(here)


def group_dir(folder: str, g: dict) -> str:
    """``folder/NAME/SPLIT``, proven inside the cache folder (names are checked before; this checks the result)."""
    from dataflex.utils.errors import DataConfigError
    from dataprep.safety import inside

    path = os.path.join(folder, g["name"], g["split"])
    inside(path, folder, f"{g.get('key', 'data')}: cache folder", DataConfigError)
    return path


def _group_done(folder: str, g: dict) -> Optional[dict]:
    try:
        with open(os.path.join(group_dir(folder, g), ".done.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tokenized(src, g: dict, tokenizer, kind: str):
    """(doc_id, input bytes, token ids, trained or None) of each document or record of one input."""
    from dataflex.data.config import hf_split, read_documents

    if kind != "text":
        from dataflex.data.records import RecordTokenizer, read_records

        encode = RecordTokenizer(tokenizer, kind, g["key"], g.get("column"))
        for doc_id, rec in read_records(src, g["key"], kind, g.get("column"), hf_split(g)):
            ids, trained = encode(rec, doc_id)
            yield doc_id, 0, ids, trained
        return
    pending = []

    def flush():
        for (doc_id, text), ids in zip(pending, tokenizer.encode_batch([t for _, t in pending])):
            yield doc_id, len(text.encode("utf-8", "replace")), ids + [tokenizer.eos_id], None
        pending.clear()

    for doc in read_documents(src, g["key"], g.get("column", "text"), hf_split(g)):
        pending.append(doc)
        if len(pending) == 512:
            yield from flush()
    yield from flush()


def _build_group(folder: str, g: dict, tokenizer, dtype: str, bar, fault: int, written: list) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dataprep.readers import Source
    from dataprep.writer import ShardWriter

    gdir = group_dir(folder, g)
    shutil.rmtree(gdir, ignore_errors=True)      # an unfinished group is redone from scratch
    os.makedirs(gdir)
    writer = ShardWriter(os.path.join(gdir, "shards"), f"{g['name']}_{g['split']}", dtype,
                         int(os.environ.get("DATAFLEX_SHARD_MB", "256")) * 2**20, gdir)
    schema = pa.schema([("doc_id", pa.string()), ("source", pa.string()), ("line", pa.int64()),
                        ("line_kind", pa.string()), ("shard", pa.string()), ("index", pa.int64()),
                        ("tokens", pa.int64())])
    prov_path = os.path.join(gdir, "provenance.parquet")
    cols = {k: [] for k in schema.names}
    docs = tokens = 0
    kind = g.get("records", "text")
    mask_path = os.path.join(gdir, MASK_FILE)       # supervised records: one byte a token, 1 = a trained label
    with pq.ParquetWriter(prov_path + ".tmp", schema) as pw, \
            (open(mask_path + ".tmp", "wb") if kind != "text" else contextlib.nullcontext()) as mask_file:
        for path, fmt in g["sources"]:
            src = Source(path, fmt)
            for doc_id, size, ids, trained in _tokenized(src, g, tokenizer, kind):
                arr = np.asarray(ids)
                shard, idx = writer.add(arr)
                if mask_file is not None:
                    mask_file.write(np.asarray(trained, dtype=np.uint8).tobytes())
                for k, v in zip(schema.names, (doc_id, path, int(doc_id.rsplit(":", 1)[1]), src.unit, shard,
                                               idx, arr.size)):
                    cols[k].append(v)
                docs, tokens = docs + 1, tokens + arr.size
                written[0] += 1
                if fault and written[0] >= fault:
                    os._exit(17)
                bar.update(size)
                if len(cols["doc_id"]) >= 65536:
                    pw.write_table(pa.table(cols, schema=schema))
                    for v in cols.values():
                        v.clear()
        if cols["doc_id"]:
            pw.write_table(pa.table(cols, schema=schema))
    fsync_file(prov_path + ".tmp")
    os.replace(prov_path + ".tmp", prov_path)
    if kind != "text":
        fsync_file(mask_path + ".tmp")
        os.replace(mask_path + ".tmp", mask_path)
    records = writer.close()
    for r in records:                   # the shards reach the disk before the marker that names them
        for ext in (".bin", ".idx"):
            fsync_file(os.path.join(gdir, r["prefix"] + ext))
    fsync_dir(os.path.join(gdir, "shards"))
    rec = {"name": g["name"], "split": g["split"], "key": g["key"], "sources": [list(s) for s in g["sources"]],
           "documents": docs, "tokens": tokens, "provenance": os.path.relpath(prov_path, folder),
           "shards": [dict(s, prefix=os.path.relpath(os.path.join(gdir, s["prefix"]), folder))
                      for s in records]}
    if kind != "text":
        rec["records"], rec["loss_mask"] = kind, os.path.relpath(mask_path, folder)
    atomic_json(os.path.join(gdir, ".done.json"), rec, indent=1, sort_keys=True)
    return rec
