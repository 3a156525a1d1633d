"""Benchmark: dataprep's standard chain against datatrove running the same chain on the same input.

    .venv/bin/python bench/bench_dataprep.py          # default: 4k docs throughput, 2.5k-10k memory (~3 min)
    .venv/bin/python bench/bench_dataprep.py --docs 4000 --skip-datatrove

Chain (both sides): normalise (Unicode NFC + whitespace) -> length filter -> Gopher quality filter ->
Gopher repetition filter -> exact dedup -> MinHash near-dup dedup (5-gram shingles, 128 hashes,
threshold 0.8) -> tokenize with the training tokenizer into Megatron .bin/.idx with EOS.

* Throughput: both run in this process after their imports, alternating ``--repeats`` times (the best
  run of each is kept, as the machine may be shared). docs/s/core = documents / CPU seconds of this
  process and its worker processes; the wall-clock figure (documents / wall / workers) is given too.
* Memory: ``launch/prep.py`` runs in a subprocess on inputs of 1x, 2x and 4x ``--mem-docs``; peak memory
  is the summed PSS of its process tree, sampled every 200 ms.
* datatrove 0.10 runs its standard building blocks with ``LocalPipelineExecutor`` (same worker count,
  fork): JsonlReader + the same normalise function + LambdaFilter + GopherQualityFilter +
  GopherRepetitionFilter (whitespace word tokenizer: no spaCy download) -> JsonlWriter; exact dedup
  (signature / find / filter) and MinHash dedup (signature / buckets / cluster / filter) stages; then
  MegatronDocumentTokenizer. Timed in process, after imports.

Prints a markdown table and writes JSON to ``bench/results/``.
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
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dataprep.testing import bench_jsonl  # noqa: E402

TOKENIZER = os.path.join(REPO, "data", "default", "tokenizer.json")
CHAIN = """
steps:
  - _target_: dataprep.steps.normalize.Normalize
  - _target_: dataprep.steps.length.LengthFilter
    min_chars: 50
    min_words: 5
  - _target_: dataprep.steps.quality.QualityFilter
  - _target_: dataprep.steps.repetition.RepetitionFilter
  - _target_: dataprep.steps.exact_dedup.ExactDedup
  - _target_: dataprep.steps.minhash_dedup.MinHashDedup
    threshold: 0.8
    num_perm: 128
    ngram: 5
  - _target_: dataprep.steps.tokenize.Tokenize
    tokenizer: TOKENIZER_PATH
"""   # the data config's tokenizer, written out (an interpolation no longer resolves here)


def make_corpus(folder: str, n_docs: int, files: int) -> None:
    os.makedirs(folder, exist_ok=True)
    per = n_docs // files
    for i in range(files):
        bench_jsonl(os.path.join(folder, f"part{i:02d}.jsonl"), per, seed=i)


def write_conf(conf: str, corpus: str) -> None:
    os.makedirs(os.path.join(conf, "data"), exist_ok=True)
    os.makedirs(os.path.join(conf, "prep"), exist_ok=True)
    with open(os.path.join(conf, "data", "bench_dataprep.yaml"), "w") as f:
        f.write(f"domains:\n  bench:\n    train: {corpus}\n    val: {os.path.join(corpus, 'part00.jsonl')}\n"
                f"tokenizer: {TOKENIZER}\n")
    with open(os.path.join(conf, "prep", "bench_dataprep.yaml"), "w") as f:
        f.write("defaults:\n  - default\n  - _self_\n" + CHAIN.replace("TOKENIZER_PATH", TOKENIZER))


def peak_rss_of(cmd: list[str]) -> tuple[int, float, int]:
    """Run ``cmd``; return (return code, wall seconds, peak summed PSS of its process tree in bytes)."""
    import psutil

    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    peak = 0
    stop = threading.Event()

    def poll():
        # PSS (proportional set size): pages shared by forked workers are counted once, not per process
        nonlocal peak
        proc = psutil.Process(p.pid)
        while not stop.is_set():
            try:
                procs = [proc] + proc.children(recursive=True)
                peak = max(peak, sum(q.memory_full_info().pss for q in procs if q.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, _ = p.communicate()
    stop.set()
    th.join()
    if p.returncode:
        print(out.decode()[-3000:], file=sys.stderr)
    return p.returncode, time.perf_counter() - t0, peak


def run_dataprep(conf: str, out: str, workers: int) -> dict:
    cmd = [sys.executable, os.path.join(REPO, "launch", "prep.py"), "--config-dir", conf, "data=bench_dataprep", "prep=bench_dataprep",
           f"prep.output_dir={out}", f"prep.execution.workers={workers}", "prep.execution.progress=false"]
    rc, wall, peak = peak_rss_of(cmd)
    if rc:
        raise SystemExit("dataprep run failed")
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    return {"records": stats["records"], "seconds": stats["timings_s"]["total_s"], "process_wall_s": wall,
            "peak_pss_mb": peak / 2**20, "kept": m["totals"]["documents"], "tokens": m["totals"]["tokens"],
            "dropped": m["totals"]["dropped"], "timings_s": stats["timings_s"]}


def _doc_text(doc):
    return doc.text.encode("utf-8")


_doc_text.__annotations__["return"] = bytes  # datatrove picks its hash function from the annotation


def run_datatrove(corpus: str, work: str, workers: int, files: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.base import PipelineStep
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.filters import (
        GopherQualityFilter,
        GopherRepetitionFilter,
        LambdaFilter,
    )
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.tokens.megatron_tokenizer import MegatronDocumentTokenizer
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    from dataprep.steps.normalize import Normalize

    class Whitespace(WordTokenizer):
        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [s for s in text.split(". ") if s]

        def span_tokenize(self, text):
            raise NotImplementedError

    class NormalizeStep(PipelineStep):
        name = "normalize"

        def __init__(self):
            super().__init__()
            self.n = Normalize()

        def run(self, data, rank=0, world_size=1):
            for doc in data:
                with self.track_time():
                    doc.text = self.n.normalize(doc.text)
                yield doc

    # datatrove 0.10's xxhash helpers pass str to xxhash 4.x, which rejects it: encode first (keeps
    # datatrove on its fast xxhash path instead of falling back to sha1)
    import datatrove.utils.hashes.xxhash as dt_xx
    import xxhash

    dt_xx.xxhash32 = lambda d: xxhash.xxh32_intdigest(d.encode("utf-8") if isinstance(d, str) else d)
    dt_xx.xxhash64 = lambda d: xxhash.xxh64_intdigest(d.encode("utf-8") if isinstance(d, str) else d)
    ws = Whitespace("en")
    d = lambda *p: os.path.join(work, *p)  # noqa: E731
    exe = lambda pipe, tasks=files, w=workers: LocalPipelineExecutor(  # noqa: E731
        pipe, tasks=tasks, workers=min(w, tasks), logging_dir=d("logs", str(time.perf_counter_ns())),
        skip_completed=False, start_method="fork")
    mh = MinhashConfig(n_grams=5, num_buckets=16, hashes_per_bucket=8)
    ex = ExactDedupConfig(content_getter=_doc_text)
    reader = lambda folder: JsonlReader(folder, glob_pattern="*.jsonl*")  # noqa: E731
    t0 = time.perf_counter()
    exe([reader(corpus), NormalizeStep(),
         LambdaFilter(lambda doc: len(doc.text) >= 50 and len(doc.text.split()) >= 5),
         GopherQualityFilter(min_doc_words=None, max_doc_words=None, min_avg_word_length=2, max_avg_word_length=12,
                             min_stop_words=None, max_non_alpha_words_ratio=None, language=ws),
         GopherRepetitionFilter(language=ws), JsonlWriter(d("filtered"))]).run()
    exe([reader(d("filtered")), ExactDedupSignature(d("exact_sigs"), config=ex)]).run()
    exe([ExactFindDedups(d("exact_sigs"), d("exact_dups"), config=ex)], tasks=1).run()
    exe([reader(d("filtered")), ExactDedupFilter(d("exact_dups"), config=ex), JsonlWriter(d("exact"))]).run()
    exe([reader(d("exact")), MinhashDedupSignature(d("mh_sigs"), config=mh, language=ws)]).run()
    exe([MinhashDedupBuckets(d("mh_sigs"), d("mh_buckets"), config=mh)], tasks=mh.num_buckets).run()
    exe([MinhashDedupCluster(d("mh_buckets"), d("mh_remove"), config=mh)], tasks=1).run()
    exe([reader(d("exact")), MinhashDedupFilter(d("mh_remove")),
         MegatronDocumentTokenizer(d("tokens"), tokenizer_name_or_path=TOKENIZER, eos_token="<|endoftext|>")]).run()
    seconds = time.perf_counter() - t0
    kept = 0
    for root, _, names in os.walk(d("tokens")):
        for n in names:
            if n.endswith(".idx"):
                import numpy as np
                with open(os.path.join(root, n), "rb") as f:
                    f.seek(9 + 8 + 1)
                    kept += int(np.frombuffer(f.read(8), dtype=np.int64)[0])
    return {"seconds": seconds, "kept": kept}


def cpu_seconds() -> float:
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def timed(fn, *args) -> dict:
    """Wall and CPU seconds (this process + reaped children) of ``fn(*args)``."""
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn(*args) or {}
    out.update(wall_s=time.perf_counter() - t0, cpu_s=cpu_seconds() - c0)
    return out


def run_dataprep_inprocess(conf: str, out: str, workers: int) -> dict:
    """dataprep in this process (imports already paid, like datatrove's), same config as the CLI."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from dataprep.run import prepare

    with initialize_config_dir(config_dir=os.path.join(REPO, "configs"), version_base=None):
        cfg = compose("prep", overrides=[f"hydra.searchpath=[file://{conf}]", "data=bench_dataprep", "prep=bench_dataprep",
                                         f"prep.output_dir={out}", f"prep.execution.workers={workers}",
                                         "prep.execution.progress=false"], return_hydra_config=False)
    c = OmegaConf.to_container(cfg, resolve=True)
    shutil.rmtree(out, ignore_errors=True)
    path = prepare(c["data"], c["prep"])
    with open(path) as f:
        m = json.load(f)
    return {"kept": m["totals"]["documents"], "records": m["totals"]["records_read"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=4000, help="documents for the throughput runs (200 words, 1.3 kB)")
    ap.add_argument("--mem-docs", type=int, default=2500, help="documents at 1x for the memory runs")
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="alternate runs of each system; the best is kept")
    ap.add_argument("--mem-scales", default="1,2,4", help="input sizes (multiples of --docs) for peak memory")
    ap.add_argument("--skip-datatrove", action="store_true")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench_dataprep_")
    w = args.workers
    results: dict = {"docs": args.docs, "files": args.files, "workers": w, "repeats": args.repeats,
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                                 "load_avg_start": os.getloadavg()}}
    try:
        import megatron.core.datasets.indexed_dataset  # noqa: F401  (import cost outside the timings)

        scales = sorted({int(x) for x in args.mem_scales.split(",")})
        for sc in scales:
            corpus = os.path.join(tmp, f"corpus_x{sc}")
            make_corpus(corpus, args.mem_docs * sc, args.files)
            write_conf(os.path.join(tmp, f"conf_x{sc}"), corpus)
        corpus, conf = os.path.join(tmp, "corpus_tp"), os.path.join(tmp, "conf_tp")
        make_corpus(corpus, args.docs, args.files)
        write_conf(conf, corpus)
        # datatrove reads the same files: the train folder plus part00 again (dataprep's val split)
        dt_in = os.path.join(tmp, "dt_in")
        os.makedirs(dt_in)
        for f in sorted(os.listdir(corpus)):
            shutil.copy(os.path.join(corpus, f), os.path.join(dt_in, f))
        shutil.copy(os.path.join(corpus, "part00.jsonl"), os.path.join(dt_in, "val_part00.jsonl"))
        ours, theirs = [], []
        for rep in range(args.repeats):
            r = timed(run_dataprep_inprocess, conf, os.path.join(tmp, "out_tp"), w)
            ours.append(r)
            print(f"dataprep rep {rep}: {r['records']} docs, wall {r['wall_s']:.1f}s, cpu {r['cpu_s']:.1f}s", flush=True)
            if not args.skip_datatrove:
                shutil.rmtree(os.path.join(tmp, "dt_work"), ignore_errors=True)
                d = timed(run_datatrove, dt_in, os.path.join(tmp, "dt_work"), w, args.files + 1)
                d["records"] = r["records"]
                theirs.append(d)
                print(f"datatrove rep {rep}: {d['records']} docs, wall {d['wall_s']:.1f}s, cpu {d['cpu_s']:.1f}s",
                      flush=True)
        best = lambda runs, k: min(x[k] for x in runs)  # noqa: E731
        results["dataprep_runs"], results["datatrove_runs"] = ours, theirs
        mem = []
        for sc in scales:
            r = run_dataprep(os.path.join(tmp, f"conf_x{sc}"), os.path.join(tmp, f"out_x{sc}"), w)
            r["scale"] = sc
            r["input_mb"] = sum(os.path.getsize(os.path.join(tmp, f"corpus_x{sc}", f))
                                for f in os.listdir(os.path.join(tmp, f"corpus_x{sc}"))) / 2**20
            mem.append(r)
            print(f"dataprep x{sc}: {r['records']} docs, peak PSS {r['peak_pss_mb']:.0f} MB", flush=True)
        results["memory"] = mem
        n = ours[0]["records"]
        o_cpu, o_wall = n / best(ours, "cpu_s"), n / best(ours, "wall_s") / w
        lines = ["| system | docs | kept | wall s | CPU s | docs/s/core (CPU) | docs/s/core (wall/workers) | speed-up (CPU) |",
                 "|---|---|---|---|---|---|---|---|",
                 f"| dataprep, local executor, {w} workers | {n} | {ours[0]['kept']} | {best(ours, 'wall_s'):.1f} | "
                 f"{best(ours, 'cpu_s'):.1f} | {o_cpu:.0f} | {o_wall:.0f} | SPEEDUP |"]
        if theirs:
            t_cpu, t_wall = n / best(theirs, "cpu_s"), n / best(theirs, "wall_s") / w
            results["speedup_cpu"], results["speedup_wall"] = o_cpu / t_cpu, o_wall / t_wall
            lines[-1] = lines[-1].replace("SPEEDUP", f"{o_cpu / t_cpu:.2f}x (wall {o_wall / t_wall:.2f}x)")
            lines.append(f"| datatrove 0.10.1, LocalPipelineExecutor, {w} workers | {n} | {theirs[0]['kept']} | "
                         f"{best(theirs, 'wall_s'):.1f} | {best(theirs, 'cpu_s'):.1f} | {t_cpu:.0f} | {t_wall:.0f} | 1.00x |")
        else:
            lines[-1] = lines[-1].replace("SPEEDUP", "")
        lines += ["", "| input | docs | input MB | peak memory MB (PSS, all processes) | run s (incl. imports) |",
                  "|---|---|---|---|---|"]
        for r in mem:
            lines.append(f"| x{r['scale']} | {r['records']} | {r['input_mb']:.0f} | {r['peak_pss_mb']:.0f} | "
                         f"{r['process_wall_s']:.1f} |")
        table = "\n".join(lines)
        results["load_avg_end"] = os.getloadavg()
        sys.path.insert(0, os.path.join(REPO, "bench"))
        import common
        results["env"] = common.environment()      # date, commit, CPU model
        print(table)
        results["table"] = table
        os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
        path = os.path.join(REPO, "bench", "results", f"bench_dataprep_{time.strftime('%Y%m%d-%H%M%S')}.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
