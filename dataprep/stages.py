"""The three stages the executor runs; each is a plain function of picklable specs, so the same code
runs in-process, in a local process pool, or as Ray tasks.

1. ``stage_task`` (parallel, one call per input file): read, run the chain; filters drop, dedup steps
   only attach signatures; write kept and dropped documents to ``work/tasks/NNNNN.{kept,dropped}.arrow``
   and a ``.done.json`` marker last (a completed task is skipped on rerun).
2. ``stage_decide`` (one pass, in the driver): replay every document in canonical order through the
   chain using the recorded outcome of local steps and the dedup indexes; gives exact per-step counts
   and the documents that dedup drops.
3. ``stage_group`` (parallel, one call per (domain, split)): write the kept documents' tokens to Megatron
   shards, the provenance rows and the rejects; ``work/groups/G.done.json`` marks it complete.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import os
import time

import numpy as np
import pyarrow as pa

from dataprep.document import Document
from dataprep.plan import Task
from dataprep.readers import read_source
from dataprep.steps.base import StepStats

BATCH_ROWS = 512


def instantiate_steps(step_cfgs: list[dict]):
    """Build step objects from ``[{_target_: ..., **kwargs}]``; errors name ``prep.steps[i]``."""
    from hydra.utils import instantiate

    from dataprep.steps.base import Step

    steps = []
    for i, cfg in enumerate(step_cfgs):
        target = cfg.get("_target_") if isinstance(cfg, dict) else None
        if not target:
            raise ValueError(f"prep.steps[{i}]: each step needs a _target_ (got {cfg!r})")
        try:
            step = instantiate(cfg, _convert_="all")
        except Exception as e:  # hydra wraps import/type errors; keep the key in front
            raise ValueError(f"prep.steps[{i}] (_target_: {target}): {e}") from e
        if not isinstance(step, Step):
            raise ValueError(f"prep.steps[{i}] (_target_: {target}) is not a dataprep Step")
        steps.append(step)
    if not any(s.name == "tokenize" for s in steps):
        raise ValueError("prep.steps: the chain needs a tokenize step (dataprep.steps.tokenize.Tokenize)")
    return steps


def file_digest(path: str) -> tuple[int, str]:
    """(bytes, sha256) of a file, or of every file in a folder (HF datasets), in sorted relative order."""
    h = hashlib.sha256()
    if os.path.isdir(path):
        total = 0
        for root, dirs, names in os.walk(path):
            dirs.sort()
            for n in sorted(names):
                p = os.path.join(root, n)
                size, digest = file_digest(p)
                total += size
                h.update(f"{os.path.relpath(p, path)}\0{digest}\n".encode())
        return total, h.hexdigest()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _atomic_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _fault(kind: str, index: int) -> int | None:
    """Fault injection for tests: ``DATAPREP_FAULT=task:3@10`` kills the worker handling task 3 after
    its 10th record; ``group:1@1`` kills the writer of group 1 after its first shard."""
    spec = os.environ.get("DATAPREP_FAULT", "")
    for part in filter(None, spec.split(",")):
        k, _, rest = part.partition(":")
        idx, _, after = rest.partition("@")
        if k == kind and int(idx) == index:
            return int(after or 1)
    return None


class _ArrowSink:
    """Buffered writer of an Arrow IPC file, renamed into place on close."""

    def __init__(self, path: str, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.rows: list[dict] = []
        self.writer = pa.ipc.new_file(path + ".tmp", schema)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        if len(self.rows) >= BATCH_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.rows:
            self.writer.write_batch(pa.RecordBatch.from_pylist(self.rows, schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self.flush()
        self.writer.close()
        os.replace(self.path + ".tmp", self.path)


def _schemas(dedup_ks: list[int]):
    sig = [pa.field(f"sig_{k}", pa.binary()) for k in dedup_ks]
    kept = pa.schema([pa.field("seq", pa.int64()), pa.field("line", pa.int64()), pa.field("text", pa.large_string()),
                      pa.field("tokens", pa.large_binary())] + sig)
    dropped = pa.schema([pa.field("seq", pa.int64()), pa.field("line", pa.int64()),
                         pa.field("text", pa.large_string()), pa.field("step", pa.int16()),
                         pa.field("reason", pa.string())] + sig)
    return kept, dropped


def task_paths(work_dir: str, index: int) -> dict[str, str]:
    base = os.path.join(work_dir, "tasks", f"{index:05d}")
    return {"kept": base + ".kept.arrow", "dropped": base + ".dropped.arrow", "done": base + ".done.json"}


def input_unchanged(path: str, done: dict) -> bool:
    """A finished task's marker is reused only for the same input: same size and modification time,
    or, when only the time differs (a copy, a touch), the same sha256."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    if os.path.isdir(path):           # a folder (HF dataset): its own size and time say nothing of its files
        return file_digest(path) == (done.get("bytes"), done.get("sha256"))
    if st.st_size != done.get("bytes"):
        return False
    if st.st_mtime_ns == done.get("mtime_ns"):
        return True
    return file_digest(path)[1] == done.get("sha256")


def stage_task(spec: dict) -> dict:
    """Stage 1 for one task. ``spec``: task, steps (configs), text_key, text_split, work_dir."""
    task: Task = spec["task"]
    paths = task_paths(spec["work_dir"], task.index)
    if os.path.exists(paths["done"]):
        with open(paths["done"]) as f:
            done = json.load(f)
        if input_unchanged(task.source.path, done):
            return done
        os.remove(paths["done"])      # the input changed since: its cached output is stale
    t_start = time.perf_counter()
    before = os.stat(task.source.path)
    steps = instantiate_steps(spec["steps"])
    dedup_ks = [k for k, s in enumerate(steps, 1) if s.kind == "dedup"]
    kept_schema, dropped_schema = _schemas(dedup_ks)
    os.makedirs(os.path.dirname(paths["kept"]), exist_ok=True)
    kept = _ArrowSink(paths["kept"], kept_schema)
    dropped = _ArrowSink(paths["dropped"], dropped_schema)
    read_stats = StepStats()
    fault_after = _fault("task", task.index)

    def sig_cols(doc: Document) -> dict:
        sigs = doc.metadata["sigs"]
        return {f"sig_{k}": sigs.get(k) for k in dedup_ks}

    def reader():
        t0 = time.perf_counter()
        for seq, rec in enumerate(read_source(task.source, spec["text_key"], spec["text_split"], task.split)):
            if fault_after is not None and seq >= fault_after:
                kept.flush()
                os._exit(17)  # simulated crash: partial .tmp files stay behind
            read_stats.docs_in += 1
            if rec.reason is not None:
                read_stats.dropped[rec.reason] += 1
                dropped.add({"seq": seq, "line": rec.line, "text": rec.raw, "step": 0, "reason": rec.reason,
                             **{f"sig_{k}": None for k in dedup_ks}})
                continue
            read_stats.docs_out += 1
            read_stats.seconds += time.perf_counter() - t0
            yield Document(rec.text, task.doc_id(rec.line),
                           {"domain": task.domain, "split": task.split, "kind": task.content, "seq": seq,
                            "line": rec.line, "sigs": {}})
            t0 = time.perf_counter()
        read_stats.seconds += time.perf_counter() - t0

    def signatures(step, k, docs):
        for doc in docs:
            t0 = time.perf_counter()
            step.stats.docs_in += 1
            if step.applies(doc):
                doc.metadata["sigs"][k] = step.signature(doc)
            step.stats.docs_out += 1
            step.stats.seconds += time.perf_counter() - t0
            yield doc

    def on_drop_for(k):
        def on_drop(doc: Document, reason: str):
            dropped.add({"seq": doc.metadata["seq"], "line": doc.metadata["line"], "text": doc.text, "step": k,
                         "reason": reason, **sig_cols(doc)})
        return on_drop

    chain = reader()
    for k, step in enumerate(steps, 1):
        if step.kind == "dedup":
            chain = signatures(step, k, chain)
        else:
            step.on_drop = on_drop_for(k)
            chain = step.run(chain)
    n_kept = 0
    for doc in chain:
        toks = doc.metadata.get("tokens")
        if toks is None:
            raise RuntimeError(f"{doc.id}: reached the end of the chain without tokens (is tokenize last and "
                               f"applied to every domain?)")
        kept.add({"seq": doc.metadata["seq"], "line": doc.metadata["line"], "text": doc.text,
                  "tokens": np.asarray(toks, dtype=np.int32).tobytes(), **sig_cols(doc)})
        n_kept += 1
    kept.close()
    dropped.close()
    size, digest = file_digest(task.source.path)
    after = os.stat(task.source.path)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise RuntimeError(f"{task.source.path} changed while dataprep read it: rerun when it is stable")
    result = {"index": task.index, "bytes": size, "sha256": digest, "mtime_ns": after.st_mtime_ns,
              "records": read_stats.docs_in,
              "kept_local": n_kept, "read": read_stats.as_dict(with_time=True),
              "steps": [s.stats.as_dict(with_time=True) for s in steps],
              "seconds": round(time.perf_counter() - t_start, 4)}
    _atomic_json(paths["done"], result)
    return result


def _iter_rows(path: str, columns: list[str]):
    """Rows of an Arrow IPC file as tuples of ``columns``, batch by batch (memory-mapped)."""
    with pa.memory_map(path) as src:
        reader = pa.ipc.open_file(src)
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            cols = [b.column(c).to_pylist() for c in columns]
            yield from zip(*cols)


def merged_rows(work_dir: str, index: int, kept_cols: list[str], dropped_cols: list[str]):
    """Kept and dropped rows of one task merged by ``seq`` (first column of both), tagged 'k' / 'd'."""
    p = task_paths(work_dir, index)
    a = ((r[0], "k", r) for r in _iter_rows(p["kept"], kept_cols))
    b = ((r[0], "d", r) for r in _iter_rows(p["dropped"], dropped_cols))
    for _, tag, row in heapq.merge(a, b, key=lambda t: t[0]):
        yield tag, row


def stage_decide(tasks: list[Task], steps, work_dir: str, progress: bool = False):
    """Stage 2: exact per-step counts in canonical order, and the dedup drops per task.

    Returns ``(read_stats, step_stats, overrides)`` with ``overrides[task_index][seq] = (step_k, reason)``
    for every document whose final fate is decided here (a dedup drop).
    """
    from tqdm import tqdm

    dedup_ks = [k for k, s in enumerate(steps, 1) if s.kind == "dedup"]
    sig_cols = [f"sig_{k}" for k in dedup_ks]
    stats = [StepStats() for _ in steps]
    indexes: dict[tuple[int, str], object] = {}
    overrides: dict[int, dict[int, tuple[int, str]]] = {}
    n_steps = len(steps)
    for task in tqdm(tasks, desc="prep: dedup decisions", unit="file", disable=not progress):
        over = overrides.setdefault(task.index, {})
        applies = [s.domains is None or task.domain in s.domains for s in steps]
        for tag, row in merged_rows(work_dir, task.index, ["seq"] + sig_cols, ["seq", "step", "reason"] + sig_cols):
            if tag == "k":
                seq, sigs, local_step, local_reason = row[0], row[1:], n_steps + 1, None
            else:
                seq, local_step, local_reason, sigs = row[0], row[1], row[2], row[3:]
                if local_step == 0:
                    continue  # malformed record: counted by the reader
            for k in range(1, n_steps + 1):
                st = stats[k - 1]
                st.docs_in += 1
                step = steps[k - 1]
                if step.kind == "dedup" and applies[k - 1]:
                    ikey = (k, step.index_key(task.domain))
                    index = indexes.get(ikey) or indexes.setdefault(ikey, step.new_index())
                    reason = index.check_and_add(f"{task.index}:{seq}", sigs[dedup_ks.index(k)])
                    if reason is not None:
                        st.dropped[reason] += 1
                        over[seq] = (k, reason)
                        break
                elif k == local_step:
                    st.dropped[local_reason] += 1
                    break
                st.docs_out += 1
    return stats, overrides


def group_paths(work_dir: str, gi: int) -> dict[str, str]:
    base = os.path.join(work_dir, "groups", f"{gi:03d}")
    return {"prov": base + ".provenance.parquet", "rejects": base + ".rejects.jsonl", "done": base + ".done.json"}


def stage_group(spec: dict) -> dict:
    """Stage 3 for one (domain, split): shards + provenance + rejects. ``spec``: gi, domain, split, tasks,
    overrides, step_names, work_dir, out_dir, shard_bytes, dtype, source_names."""
    import pyarrow.parquet as pq

    from dataprep.writer import ShardWriter

    gi, domain, split = spec["gi"], spec["domain"], spec["split"]
    paths = group_paths(spec["work_dir"], gi)
    if os.path.exists(paths["done"]):
        with open(paths["done"]) as f:
            return json.load(f)
    os.makedirs(os.path.dirname(paths["done"]), exist_ok=True)
    fault_after = _fault("group", gi)
    shard_dir = os.path.join(spec["out_dir"], "shards", domain, split)
    writer = ShardWriter(shard_dir, f"{domain}_{split}", spec["dtype"], spec["shard_bytes"], spec["out_dir"],
                         spec.get("owned_log"))
    prov = {"doc_id": [], "domain": [], "split": [], "source": [], "line": [], "line_kind": [], "shard": [],
            "index": [], "tokens": []}
    step_names = spec["step_names"]
    with open(paths["rejects"] + ".tmp", "w", encoding="utf-8") as rej:
        for task in spec["tasks"]:
            over = spec["overrides"].get(task.index, {})
            src_name = spec["source_names"][task.index]
            for tag, row in merged_rows(spec["work_dir"], task.index, ["seq", "line", "text", "tokens"],
                                        ["seq", "line", "text", "step", "reason"]):
                seq, line = row[0], row[1]
                doc_id = task.doc_id(line)
                if tag == "k" and seq not in over:
                    toks = np.frombuffer(row[3], dtype=np.int32)
                    shard, idx = writer.add(toks)
                    for c, v in zip(prov, (doc_id, domain, split, src_name, line, task.source.unit, shard, idx,
                                           len(toks))):
                        prov[c].append(v)
                    if fault_after is not None and len(writer.records) >= fault_after:
                        os._exit(18)
                    continue
                step, reason = over[seq] if tag == "k" or seq in over else (row[3], row[4])
                rej.write(json.dumps({"doc_id": doc_id, "domain": domain, "split": split, "source": src_name,
                                      task.source.unit: line, "step": step_names[step], "reason": reason,
                                      "text": row[2]}, ensure_ascii=False) + "\n")
    shards = writer.close()
    os.replace(paths["rejects"] + ".tmp", paths["rejects"])
    table = pa.table({"doc_id": pa.array(prov["doc_id"], pa.string()), "domain": pa.array(prov["domain"], pa.string()),
                      "split": pa.array(prov["split"], pa.string()), "source": pa.array(prov["source"], pa.string()),
                      "line": pa.array(prov["line"], pa.int64()), "line_kind": pa.array(prov["line_kind"], pa.string()),
                      "shard": pa.array(prov["shard"], pa.string()), "index": pa.array(prov["index"], pa.int64()),
                      "tokens": pa.array(prov["tokens"], pa.int64())})
    pq.write_table(table, paths["prov"] + ".tmp")
    os.replace(paths["prov"] + ".tmp", paths["prov"])
    result = {"gi": gi, "domain": domain, "split": split, "shards": shards,
              "documents": int(sum(s["documents"] for s in shards)), "tokens": int(sum(s["tokens"] for s in shards))}
    _atomic_json(paths["done"], result)
    return result
