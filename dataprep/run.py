"""Orchestration: plan -> stage 1 (parallel) -> stage 2 (decide) -> stage 3 (parallel) -> manifest.

``prepare(data_cfg, prep_cfg)`` is the Python entry point (``launch/prep.py`` calls it with the composed
Hydra config). Everything hashed (shards, provenance, rejects, manifest) is a function of the inputs and
the recipe only: no timestamps, absolute temp paths or scheduling order. Timings go to ``stats.json``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import threading
import time

from dataprep import __version__
from dataprep.executors import make_executor
from dataprep.plan import build_plan
from dataprep.readers import InputError, Source
from dataprep.safety import inside
from dataprep.stages import (
    group_paths,
    instantiate_steps,
    stage_decide,
    stage_group,
    stage_task,
)
from dataprep.tokenizer import load_tokenizer
from dataprep.writer import SHARD_SUFFIXES, note_owned, sha256_file, token_dtype

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
NOT_IN_RECIPE = ("execution", "output_dir", "overwrite")  # how and where it runs does not change the result
OWNED = ".dataprep-written.txt"   # every shard prefix prep ever started in this output folder, until the next success


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _read_step_entry(prep: dict) -> dict:
    return {"name": "read", "target": "dataprep.readers.read_source",
            "params": {"text_key": prep.get("text_key", "text"), "text_split": prep.get("text_split", "paragraph")}}


def _chdir_stage_task(spec):
    os.chdir(spec["cwd"])
    return stage_task(spec)


def _chdir_stage_group(spec):
    os.chdir(spec["cwd"])
    return stage_group(spec)


def prepare(data_cfg: dict, prep_cfg: dict) -> str:
    """Run the chain; returns the path of the written ``manifest.json``."""
    t_run = time.perf_counter()
    out_dir = str(prep_cfg.get("output_dir") or "")
    if not out_dir:
        raise ValueError("prep.output_dir: not set")
    execution = dict(prep_cfg.get("execution") or {})
    recipe = {"data": data_cfg, "prep": {k: v for k, v in prep_cfg.items() if k not in NOT_IN_RECIPE}}
    recipe_sha = hashlib.sha256(canonical_json(recipe)).hexdigest()

    tasks = build_plan(data_cfg)
    step_cfgs = list(prep_cfg.get("steps") or [])
    steps = instantiate_steps(step_cfgs)
    tok_step = next(s for s in steps if s.name == "tokenize")
    if not os.path.isfile(tok_step.tokenizer_path):
        raise FileNotFoundError(f"tokenizer file not found: {tok_step.tokenizer_path!r} "
                                f"(prep.steps tokenize.tokenizer, default ${{data.tokenizer}})")
    tokenizer = load_tokenizer(tok_step.tokenizer_path)
    dtype = token_dtype(tokenizer.vocab_size)

    overwrite = prep_cfg.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise InputError(f"prep.overwrite={overwrite!r}: expected true or false")
    owned = owned_prefixes(out_dir)
    foreign = foreign_files(out_dir, owned)
    if foreign and not overwrite:
        raise InputError(
            f"prep.output_dir: {os.path.join(out_dir, 'shards')} holds {len(foreign)} file(s) dataprep did not "
            f"write (e.g. {foreign[0]}); prep writes and deletes only its own files there, so nothing was changed. "
            "Choose another prep.output_dir, move those files away, or set prep.overwrite=true to delete them")
    os.makedirs(out_dir, exist_ok=True)
    owned_log = os.path.join(out_dir, OWNED)
    note_owned(owned_log, sorted(owned))   # the previous manifest's shards stay known as ours after it goes
    manifest_path = os.path.join(out_dir, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the manifest is the commit point: absent while shards may change
    work_dir = os.path.abspath(os.path.join(out_dir, ".work", recipe_sha[:16]))
    os.makedirs(work_dir, exist_ok=True)
    cwd = os.getcwd()
    abs_tasks = [dataclasses.replace(t, source=Source(os.path.abspath(t.source.path), t.source.fmt)) for t in tasks]
    common = {"steps": step_cfgs, "text_key": prep_cfg.get("text_key", "text"),
              "text_split": prep_cfg.get("text_split", "paragraph"), "work_dir": work_dir, "cwd": cwd}
    groups: list[tuple[str, str]] = []
    for t in tasks:
        if t.group not in groups:
            groups.append(t.group)
    # every configured (domain, split) gets an entry, even if it ends up empty
    timings = {}
    with make_executor(execution) as ex:
        # megatron-core takes seconds to import: do it while the workers read (workers are already forked)
        importer = threading.Thread(target=importlib.import_module,
                                    args=("megatron.core.datasets.indexed_dataset",), daemon=True)
        importer.start()
        t0 = time.perf_counter()
        task_results = ex.map(_chdir_stage_task, [dict(common, task=t) for t in abs_tasks], "prep: read+filter+tokenize")
        timings["stage1_read_filter_tokenize_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        step_stats, overrides = stage_decide(abs_tasks, steps, work_dir, progress=bool(execution.get("progress", True)))
        timings["stage2_decide_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        step_names = ["read"] + [s.name for s in steps]
        source_names = {t.index: t.source.path for t in tasks}
        gspecs = [{"gi": gi, "domain": d, "split": s, "tasks": [t for t in abs_tasks if t.group == (d, s)],
                   "overrides": {t.index: overrides.get(t.index, {}) for t in abs_tasks if t.group == (d, s)},
                   "step_names": step_names, "work_dir": work_dir, "out_dir": os.path.abspath(out_dir),
                   "shard_bytes": int(float(prep_cfg.get("shard_size_mb", 64)) * 2**20), "dtype": dtype,
                   "source_names": source_names, "cwd": cwd, "owned_log": os.path.abspath(owned_log)}
                  for gi, (d, s) in enumerate(groups)]
        importer.join()
        group_results = ex.map(_chdir_stage_group, gspecs, "prep: write shards", write=True)
        timings["stage3_write_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    manifest = _assemble(out_dir, work_dir, recipe, recipe_sha, tasks, steps, step_cfgs, prep_cfg, task_results,
                         step_stats, group_results, tokenizer, tok_step, dtype, groups, overwrite)
    tmp = manifest_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, manifest_path)
    _atomic_lines(owned_log, sorted({s["prefix"] for s in manifest["shards"]}))   # ours now: what the manifest lists
    timings["assemble_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_run
    _write_stats(out_dir, execution, task_results, steps, timings, manifest)
    if not prep_cfg.get("keep_work", False):
        shutil.rmtree(inside(os.path.join(out_dir, ".work"), out_dir, "prep work folder"), ignore_errors=True)
    return manifest_path


def owned_prefixes(out_dir: str) -> set:
    """Shard prefixes (relative to ``out_dir``) prep wrote there: its previous manifest's, and those a
    run that did not finish started (the log ``OWNED``)."""
    out = set()
    try:
        with open(os.path.join(out_dir, MANIFEST), encoding="utf-8") as f:
            m = json.load(f)
        if m.get("tool", {}).get("name") == "dataprep":
            out |= {s["prefix"] for s in m.get("shards", []) if isinstance(s.get("prefix"), str)}
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    try:
        with open(os.path.join(out_dir, OWNED), encoding="utf-8") as f:
            out |= {line.strip() for line in f if line.strip()}
    except OSError:
        pass
    return out


def _owner(rel: str) -> str | None:
    for suffix in SHARD_SUFFIXES:
        if rel.endswith(suffix):
            return rel[:-len(suffix)]
    return None


def foreign_files(out_dir: str, owned: set) -> list[str]:
    """Files under ``out_dir/shards`` prep did not write (sorted paths)."""
    found = []
    for root, dirs, names in os.walk(os.path.join(out_dir, "shards")):
        dirs.sort()
        for n in sorted(names):
            rel = os.path.relpath(os.path.join(root, n), out_dir)
            if _owner(rel) not in owned:
                found.append(os.path.join(root, n))
    return found


def _atomic_lines(path: str, lines) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(x + "\n" for x in lines)
    os.replace(path + ".tmp", path)


def _assemble(out_dir, work_dir, recipe, recipe_sha, tasks, steps, step_cfgs, prep_cfg, task_results, step_stats,
              group_results, tokenizer, tok_step, dtype, groups, overwrite=False) -> dict:
    import megatron.core
    import pyarrow.parquet as pq

    # provenance: concatenation of the group tables in canonical order
    prov_path = os.path.join(out_dir, "provenance.parquet")
    parts = [pq.read_table(group_paths(work_dir, r["gi"])["prov"]) for r in group_results]
    schema = parts[0].schema
    with pq.ParquetWriter(prov_path + ".tmp", schema) as w:
        for p in parts:
            if p.num_rows:
                w.write_table(p)
    os.replace(prov_path + ".tmp", prov_path)
    n_prov = sum(p.num_rows for p in parts)
    # rejects: concatenation in canonical order
    rej_path = os.path.join(out_dir, "rejects.jsonl")
    n_rej = 0
    with open(rej_path + ".tmp", "wb") as out:
        for r in group_results:
            with open(group_paths(work_dir, r["gi"])["rejects"], "rb") as f:
                for line in f:
                    out.write(line)
                    n_rej += 1
    os.replace(rej_path + ".tmp", rej_path)
    # tokenizer copy next to the shards, so the prepared folder is self-contained
    tok_copy = os.path.join(out_dir, "tokenizer.json")
    shutil.copyfile(tokenizer.path, tok_copy + ".tmp")
    os.replace(tok_copy + ".tmp", tok_copy)
    # drop shard files a previous, different run of prep left behind: only those (prep.overwrite: all others)
    keep = {s["prefix"] + ext for r in group_results for s in r["shards"] for ext in (".bin", ".idx")}
    owned = owned_prefixes(out_dir)
    for root, _, names in os.walk(os.path.join(out_dir, "shards")):
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), out_dir)
            if rel not in keep and (overwrite or _owner(rel) in owned):
                os.remove(inside(os.path.join(root, n), os.path.join(out_dir, "shards"), "stale shard"))

    read = {"docs_in": 0, "docs_out": 0, "dropped": {}}
    inputs = []
    for t, r in zip(tasks, task_results):
        read["docs_in"] += r["read"]["docs_in"]
        read["docs_out"] += r["read"]["docs_out"]
        for k, v in r["read"]["dropped"].items():
            read["dropped"][k] = read["dropped"].get(k, 0) + v
        inputs.append({"path": t.source.path, "format": t.source.fmt, "domain": t.domain, "split": t.split,
                       "config_key": t.key, "bytes": r["bytes"], "sha256": r["sha256"], "records": r["records"],
                       "malformed": dict(sorted(r["read"]["dropped"].items()))})
    read["dropped"] = dict(sorted(read["dropped"].items()))
    entries = [dict(_read_step_entry(prep_cfg), **read)]
    for cfg, step, st in zip(step_cfgs, steps, step_stats):
        entries.append({"name": step.name, "target": cfg["_target_"], "params": step.params(), **st.as_dict()})
    fp = hashlib.sha256(canonical_json(recipe["data"])).hexdigest()
    for e in entries:  # fingerprint chain: fp_k = H(fp_{k-1}, step_k)
        fp = hashlib.sha256((fp + ":").encode() + canonical_json({k: e[k] for k in ("name", "target", "params")})).hexdigest()
        e["fingerprint"] = fp

    shards, domains = [], {}
    for (d, s), r in zip(groups, group_results):
        dom = domains.setdefault(d, {"documents": 0, "tokens": 0, "splits": {}})
        dom["splits"][s] = {"documents": r["documents"], "tokens": r["tokens"], "shards": len(r["shards"])}
        dom["documents"] += r["documents"]
        dom["tokens"] += r["tokens"]
        for sh in r["shards"]:
            shards.append({"domain": d, "split": s, **sh})
    by_reason: dict[str, int] = {}
    for e in entries:
        for k, v in e["dropped"].items():
            by_reason[k] = by_reason.get(k, 0) + v
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "dataprep", "version": __version__},
        "config": recipe,
        "config_sha256": recipe_sha,
        "tokenizer": {"source": tok_step.tokenizer_path, "path": "tokenizer.json", "sha256": tokenizer.sha256,
                      "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id},
        "format": {"type": "megatron-indexed", "writer": "megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder",
                   "megatron_core_version": getattr(megatron.core, "__version__", "unknown"), "dtype": dtype,
                   "sequence": "one sequence per document", "append_eos": bool(tok_step.append_eos)},
        "inputs": inputs,
        "steps": entries,
        "shards": shards,
        "domains": domains,
        "totals": {"documents": sum(v["documents"] for v in domains.values()),
                   "tokens": sum(v["tokens"] for v in domains.values()), "shards": len(shards),
                   "records_read": read["docs_in"], "dropped": dict(sorted(by_reason.items()))},
        "provenance": {"path": "provenance.parquet", "rows": n_prov, "sha256": sha256_file(prov_path),
                       "columns": schema.names},
        "rejects": {"path": "rejects.jsonl", "rows": n_rej, "sha256": sha256_file(rej_path)},
    }


def _write_stats(out_dir, execution, task_results, steps, timings, manifest) -> None:
    """Timings and throughput (not part of the manifest, which must not change between reruns)."""
    step_s = [0.0] * len(steps)
    read_s = 0.0
    for r in task_results:
        read_s += r["read"].get("seconds", 0.0)
        for i, st in enumerate(r["steps"]):
            step_s[i] += st.get("seconds", 0.0)
    records = manifest["totals"]["records_read"]
    stats = {"execution": execution, "timings_s": {k: round(v, 4) for k, v in timings.items()},
             "step_seconds_stage1": {"read": round(read_s, 4),
                                     **{f"{i + 1}:{s.name}": round(t, 4) for i, (s, t) in enumerate(zip(steps, step_s))}},
             "records": records, "docs_per_s": round(records / max(timings["total_s"], 1e-9), 2)}
    with open(os.path.join(out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=1, sort_keys=True)
