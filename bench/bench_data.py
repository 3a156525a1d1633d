"""Data at scale: start-up time and peak memory against corpus size, and the sampler at 1e9 samples.

    .venv/bin/python bench/bench_data.py                       # 10 MB, 100 MB and 1 GB of tokens, 10 MB of raw JSONL
    .venv/bin/python bench/bench_data.py --sizes-mb 10 100 --raw-mb 5 --workdir /tmp/x

Corpora are generated here, never committed: token shards are written directly with numpy (random
uint16 tokens, documents of 100-3,000 tokens, two domains, a train and a val split, shards of at most
256 MB) beside a dataprep-style manifest.json; the raw case is JSONL text tokenized by the first launch.
Each launch is a fresh Python process that does what launch/train.py does before its first step
(load_domains, the validation set capped at 64 samples a domain, DataFlex, the first batch), so
"start-up s" includes starting Python and importing torch and megatron-core. "first launch" builds the
sample index (and, for raw files, the token cache); "cached launch" reuses them. Peak RSS is the
process's own maximum resident set (VmHWM; ru_maxrss would count the parent's RSS at fork), with its
value right after the imports; the "RSS at first step" column splits what the process holds when
training would start: anonymous memory, and file-backed pages (shared libraries and
the shard pages read; clean and reclaimable; on kernels with large page-cache folios one sample's read
maps a whole folio).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
T0 = time.perf_counter()


def child(config: str, seq_len: int) -> None:
    """One launch, in its own process: what train.py does before the first step (no model)."""
    t = time.perf_counter()
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (timed as import, not as loading)
    import torch  # noqa: F401

    import dataflex
    from dataflex.data.domains import MixtureDataset, load_domains
    t_import = time.perf_counter() - t
    peaks = {"import": _peak_mb()}
    t = time.perf_counter()
    domains = load_domains(json.loads(config), seq_len, max_val_samples=64, progress=False)
    t_load = time.perf_counter() - t
    peaks["load_domains"] = _peak_mb()
    t = time.perf_counter()
    val = MixtureDataset(domains.val)
    flex = dataflex.DataFlex(domains.train, 16, seed=0, rank=0, world_size=1, datasets={"val": val})
    peaks["dataflex"] = _peak_mb()
    batch = flex.next_batch()
    peaks["first batch"] = _peak_mb()
    val.batch(torch.arange(len(val))[:16])
    t_first = time.perf_counter() - t
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    rss = {k: int(status[k].split()[0]) / 1024 for k in ("RssAnon", "RssFile") if k in status}
    ru = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"cpu_s": ru.ru_utime + ru.ru_stime, "rss_now_mb": rss, "peak_after_mb": peaks, "import_s": t_import, "load_s": t_load, "first_batch_s": t_first,
                      "in_process_s": time.perf_counter() - T0, "samples": len(flex.data),
                      "tokens_in_batch": int(batch["loss_mask"].sum()),
                      "peak_rss_mb": _peak_mb()}))


def _peak_mb() -> float:
    """VmHWM, this process's own peak RSS (ru_maxrss would include the parent's RSS at fork time)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def make_shards(out: Path, total_mb: float, seed: int = 0) -> Path:
    """A dataprep-like folder of `total_mb` MB of uint16 tokens: manifest.json, tokenizer.json, shards."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import _IndexWriter

    manifest = out / "manifest.json"
    if manifest.exists():
        return manifest
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    shards, domains = [], {}
    for name in ("a", "b"):
        for split, share in (("train", 0.49), ("val", 0.01)):
            tokens_left = int(total_mb * 2**20 * share / 2)
            k = 0
            while tokens_left > 0:
                n = min(tokens_left, 128 * 2**20)                         # 256 MB shards
                lengths = rng.integers(100, 3000, size=n // 100 + 16)
                lengths = lengths[:np.searchsorted(lengths.cumsum(), n) + 1]
                lengths[-1] -= lengths.sum() - n
                lengths = lengths[lengths > 0]
                prefix = out / "shards" / name / split / f"{name}_{split}_{k:05d}"
                prefix.parent.mkdir(parents=True, exist_ok=True)
                with open(f"{prefix}.bin", "wb") as f:
                    for start in range(0, n, 32 * 2**20):
                        f.write(rng.integers(0, 2048, size=min(32 * 2**20, n - start), dtype=np.uint16).tobytes())
                with _IndexWriter(f"{prefix}.idx", np.uint16) as w:
                    w.write(lengths.astype(np.int32), None, np.arange(len(lengths) + 1, dtype=np.int64))
                rel = str(prefix.relative_to(out))
                shards.append({"domain": name, "split": split, "prefix": rel, "documents": len(lengths),
                               "tokens": int(n), "bin": {"sha256": sha256(Path(f"{prefix}.bin"))}})
                dom = domains.setdefault(name, {"documents": 0, "tokens": 0, "splits": {}})
                sp = dom["splits"].setdefault(split, {"documents": 0, "tokens": 0})
                sp["documents"] += len(lengths)
                sp["tokens"] += int(n)
                tokens_left -= n
                k += 1
    shutil.copyfile(ROOT / "data" / "default" / "tokenizer.json", out / "tokenizer.json")
    manifest.write_text(json.dumps({"tokenizer": {"path": "tokenizer.json"}, "shards": shards, "domains": domains}))
    return manifest


def make_jsonl(out: Path, total_mb: float, seed: int = 0) -> dict:
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    words = np.array("the of and to in data model token sample weight loss domain train shard cache index "
                     "epoch batch step rank seed value table file line text word order".split())
    rng = np.random.default_rng(seed)
    cfg = {"domains": {}, "tokenizer": str(ROOT / "data" / "default" / "tokenizer.json")}
    for name in ("a", "b"):
        path = out / f"{name}.jsonl"
        if not path.exists():
            with open(path, "w") as f:
                written = 0
                while written < total_mb * 2**20 / 2:
                    line = json.dumps({"text": " ".join(words[rng.integers(0, len(words), rng.integers(50, 800))])})
                    f.write(line + "\n")
                    written += len(line) + 1
        cfg["domains"][name] = {"train": str(path), "val": str(path)}
    return cfg


def launch(config: dict, seq_len: int, env: dict) -> dict:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(config), "--seq-len", str(seq_len)],
                          capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["startup_s"] = time.perf_counter() - t
    return res


def sampler_bench(sizes=(10**3, 10**9), draws: int = 200, batch: int = 256) -> list[dict]:
    import torch

    from dataflex.core.sampler import DataAwareSampler

    rows = []
    DataAwareSampler([5], seed=0).draw(batch)  # warm-up: lazy imports and caches outside the traced part
    for n in sizes:
        tracemalloc.start()
        s = DataAwareSampler([n], seed=0)
        s.draw(batch)
        t = time.perf_counter()
        for _ in range(draws):
            s.draw(batch)
        rate = draws * batch / (time.perf_counter() - t)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        buf = io.BytesIO()
        torch.save(s.state_dict(), buf)
        rows.append({"samples": n, "draws_per_s": rate, "peak_traced_kib": peak / 1024,
                     "state_bytes": len(buf.getvalue()), "randperm_bytes": 8 * n,
                     "keep_mask_bitset_bytes": (n + 7) // 8})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes-mb", type=float, nargs="+", default=[10, 100, 1024])
    p.add_argument("--raw-mb", type=float, default=10)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--workdir", default="/tmp/dataflex-bench-data")
    p.add_argument("--keep", action="store_true", help="keep the generated corpora")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.seq_len)
    import common

    work = Path(args.workdir)
    env = dict(os.environ, DATAFLEX_CACHE=str(work / "cache"), PYTHONWARNINGS="ignore")
    rows = []
    for mb in args.sizes_mb:
        t = time.perf_counter()
        manifest = make_shards(work / f"shards_{mb:g}mb", mb)
        gen_s = time.perf_counter() - t
        shutil.rmtree(manifest.parent / "index", ignore_errors=True)
        for kind in ("first", "cached"):
            r = launch({"manifest": str(manifest)}, args.seq_len, env)
            rows.append({"corpus": f"{mb:g} MB tokens (shards)", "launch": kind, "generate_s": gen_s, **r})
            print(json.dumps(rows[-1]), flush=True)
        if not args.keep:
            shutil.rmtree(manifest.parent, ignore_errors=True)
    if args.raw_mb:
        cfg = make_jsonl(work / "raw", args.raw_mb)
        shutil.rmtree(work / "cache", ignore_errors=True)
        for kind in ("first", "cached"):
            r = launch(cfg, args.seq_len, env)
            rows.append({"corpus": f"{args.raw_mb:g} MB raw JSONL", "launch": kind, **r})
            print(json.dumps(rows[-1]), flush=True)
    sampler = sampler_bench()
    header = ["corpus", "launch", "samples", "start-up s (wall)", "CPU s", "of which imports s", "load_domains s",
              "peak RSS MB", "peak after imports MB", "RSS at first step: anon / file MB"]
    table = common.markdown_table(header, [[r["corpus"], r["launch"], f"{r['samples']:,}", f"{r['startup_s']:.1f}",
                                            f"{r['cpu_s']:.1f}",
                                            f"{r['import_s']:.1f}", f"{r['load_s']:.2f}", f"{r['peak_rss_mb']:.0f}",
                                            f"{r['peak_after_mb']['import']:.0f}",
                                            f"{r['rss_now_mb']['RssAnon']:.0f} / {r['rss_now_mb']['RssFile']:.0f}"]
                                           for r in rows])
    stable = common.markdown_table(
        ["domain samples", "draws/s (batches of 256)", "peak traced memory KiB", "sampler state bytes",
         "randperm would hold", "keep-mask bitset"],
        [[f"{r['samples']:.0e}", f"{r['draws_per_s']:,.0f}", f"{r['peak_traced_kib']:.0f}", f"{r['state_bytes']:,}",
          f"{r['randperm_bytes'] / 2**20:,.2f} MiB", f"{r['keep_mask_bitset_bytes'] / 2**20:,.2f} MiB"]
         for r in sampler])
    print("\n" + table + "\n\n" + stable)
    path = common.save_json("data.json", {"launches": rows, "sampler": sampler, "command": common.command_line(),
                                          "env": common.environment(), "loadavg": os.getloadavg()})
    print(f"saved {path.relative_to(common.ROOT)}; load average {os.getloadavg()[0]:.1f}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
