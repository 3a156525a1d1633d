"""Near-duplicate recall and precision on planted pairs: dataprep's MinHashDedup next to datatrove's.

    .venv/bin/python bench/bench_dedup_recall.py                 # 2000 pairs, about 20 s on one core
    .venv/bin/python bench/bench_dedup_recall.py --pairs 200 --out /tmp/x.json

Input: ``--pairs`` pairs (an original of ``--words`` random lowercase words and a copy with words replaced
until its exact word 5-gram Jaccard falls to a target drawn uniformly from 0.6-0.95,
``dataprep.testing.planted_pairs``), all originals first, then all copies: a pair is *removed* when one
of its two documents is dropped. The decision threshold is 0.8 everywhere, 128 hashes.

* recall: removed pairs among those at exact Jaccard >= 0.8; precision: pairs at >= 0.8 among the
  removed ones; and the removal rate per Jaccard bin of 0.05.
* dataprep ``verify: exact`` (the default) and ``verify: minhash``, both with LSH banded for recall
  0.999 at the threshold (b = 25, r = 5); "dataprep before issue 26": datasketch's banding for 0.8
  (b = 9, r = 13) and the MinHash estimate, as the step was.
* datatrove 0.10 (signature / buckets / cluster / filter, ``LocalPipelineExecutor``, one task): its
  defaults (14 buckets of 8 hashes, 112 hashes) and the layout of bench_dataprep.py (16 x 8 = 128).
  datatrove removes every pair that shares a bucket (no verification), so its threshold is the bands'.

Writes JSON (date, commit, machine, load) to ``bench/results/bench_dedup_recall.json`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataprep.document import Document  # noqa: E402
from dataprep.testing import planted_pairs  # noqa: E402

THRESHOLD = 0.8
BINS = [0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def docs_of(pairs):
    return ([(f"a{i}", a) for i, (a, _, _) in enumerate(pairs)] + [(f"b{i}", b) for i, (_, b, _) in enumerate(pairs)])


def run_dataprep(pairs, **kw) -> set:
    from dataprep.steps.minhash_dedup import MinHashDedup

    step = MinHashDedup(threshold=THRESHOLD, num_perm=128, **kw)
    return {d.id for d in step.run(Document(t, i, {"domain": "d"}) for i, t in docs_of(pairs))}


def run_dataprep_before(pairs) -> set:
    """The step as it was before issue 26: datasketch's banding at the threshold, the MinHash estimate."""
    from datasketch import MinHashLSH

    from dataprep.steps.minhash_dedup import MinHashDedup, _LSHIndex

    step = MinHashDedup(threshold=THRESHOLD, num_perm=128, verify="minhash")
    default = MinHashLSH(threshold=THRESHOLD, num_perm=128)
    index = _LSHIndex(THRESHOLD, 128, step.seed, (default.b, default.r), "minhash")
    return {i for i, t in docs_of(pairs) if index.check_and_add(i, step.signature(Document(t, i, {}))) is None}


def run_datatrove(pairs, work: str, buckets: int, per_bucket: int) -> set:
    import datatrove.utils.hashes.xxhash as dt_xx
    import xxhash
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            raise NotImplementedError

    # as in bench_dataprep.py: datatrove 0.10's xxhash helpers pass str to xxhash 4.x; encode first
    dt_xx.xxhash32 = lambda d: xxhash.xxh32_intdigest(d.encode("utf-8") if isinstance(d, str) else d)
    dt_xx.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode("utf-8") if isinstance(d, str) else d)
    d = lambda *p: os.path.join(work, *p)  # noqa: E731
    os.makedirs(d("in"))
    with open(d("in", "docs.jsonl"), "w") as f:
        for i, t in docs_of(pairs):
            f.write(json.dumps({"text": t, "id": i}) + "\n")
    exe = lambda pipe, tasks=1: LocalPipelineExecutor(pipe, tasks=tasks, workers=1,  # noqa: E731
                                                      logging_dir=d("logs", str(time.perf_counter_ns())),
                                                      skip_completed=False)
    mh = MinhashConfig(n_grams=5, num_buckets=buckets, hashes_per_bucket=per_bucket)
    ws = Whitespace("en")
    exe([JsonlReader(d("in")), MinhashDedupSignature(d("sigs"), config=mh, language=ws)]).run()
    exe([MinhashDedupBuckets(d("sigs"), d("buckets"), config=mh)], tasks=mh.num_buckets).run()
    exe([MinhashDedupCluster(d("buckets"), d("remove"), config=mh)]).run()
    exe([JsonlReader(d("in")), MinhashDedupFilter(d("remove")), JsonlWriter(d("out"), compression=None)]).run()
    kept = set()
    for name in os.listdir(d("out")):
        with open(d("out", name)) as f:
            kept.update(json.loads(line)["id"] for line in f)
    return kept


def score(pairs, kept: set) -> dict:
    removed = [not (f"a{i}" in kept and f"b{i}" in kept) for i in range(len(pairs))]
    js = [j for _, _, j in pairs]
    pos = [r for r, j in zip(removed, js) if j >= THRESHOLD]
    tp, n_removed = sum(pos), sum(removed)
    bins = []
    for lo, hi in zip(BINS, BINS[1:] + [1.0001]):
        sel = [r for r, j in zip(removed, js) if lo <= j < hi]
        if sel:
            bins.append({"jaccard": f"{lo:.2f}-{min(hi, 1.0):.2f}", "pairs": len(sel), "removed": sum(sel),
                         "rate": sum(sel) / len(sel)})
    return {"recall": tp / len(pos), "precision": tp / n_removed if n_removed else None,
            "removed_below": n_removed - tp, "pairs_below": len(js) - len(pos), "missed_above": len(pos) - tp,
            "pairs_above": len(pos), "bins": bins,
            "both_lost": sum(f"a{i}" not in kept and f"b{i}" not in kept for i in range(len(pairs)))}


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=2000)
    ap.add_argument("--words", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-datatrove", action="store_true")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results", "bench_dedup_recall.json"))
    args = ap.parse_args()
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit, "dirty": dirty,
              "command": "python bench/bench_dedup_recall.py " + " ".join(sys.argv[1:]),
              "machine": machine(), "load_avg_start": os.getloadavg(), "threshold": THRESHOLD,
              "pairs": args.pairs, "words": args.words, "seed": args.seed, "systems": {}}
    t0 = time.perf_counter()
    pairs = planted_pairs(args.pairs, 0.6, 0.95, n_words=args.words, seed=args.seed)
    result["generate_s"] = time.perf_counter() - t0
    systems = {
        "dataprep verify=exact (default), bands 25x5": lambda: run_dataprep(pairs),
        "dataprep verify=minhash, bands 25x5": lambda: run_dataprep(pairs, verify="minhash"),
        "dataprep before issue 26 (datasketch bands 9x13, minhash estimate)": lambda: run_dataprep_before(pairs),
    }
    tmp = tempfile.mkdtemp(prefix="bench_dedup_recall_")
    if not args.skip_datatrove:
        systems["datatrove 0.10 default (14 buckets x 8 hashes)"] = lambda: run_datatrove(pairs, os.path.join(tmp, "a"), 14, 8)
        systems["datatrove 0.10, 16 buckets x 8 hashes (bench_dataprep.py)"] = \
            lambda: run_datatrove(pairs, os.path.join(tmp, "b"), 16, 8)
    try:
        for name, fn in systems.items():
            t = time.perf_counter()
            kept = fn()
            r = score(pairs, kept)
            r["seconds"] = time.perf_counter() - t
            result["systems"][name] = r
            print(f"{name}: recall {r['recall']:.4f} ({r['missed_above']} of {r['pairs_above']} missed), precision "
                  f"{r['precision']:.4f} ({r['removed_below']} of {r['pairs_below']} below {THRESHOLD} removed), "
                  f"{r['seconds']:.1f}s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["load_avg_end"] = os.getloadavg()
    names = list(result["systems"])
    lines = ["| Jaccard | pairs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for k, b in enumerate(result["systems"][names[0]]["bins"]):
        lines.append(f"| {b['jaccard']} | {b['pairs']} | "
                     + " | ".join(f"{result['systems'][n]['bins'][k]['rate']:.3f}" for n in names) + " |")
    lines.append("| recall (J >= 0.8) | | " + " | ".join(f"{result['systems'][n]['recall']:.3f}" for n in names) + " |")
    lines.append("| precision | | " + " | ".join(f"{result['systems'][n]['precision']:.3f}" for n in names) + " |")
    result["table"] = "\n".join(lines)
    print(result["table"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
