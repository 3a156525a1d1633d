"""Build the benchmark corpus: sources -> per-domain train/val JSONL and target subtasks -> byte-level BPE
-> dataprep's default chain -> Megatron shards with a manifest, under one cache folder:

    ROOT/sources/                 fetched .deb files and their unpacked trees
    ROOT/raw/DOMAIN/{train,val}.jsonl, ROOT/target/SUBTASK.jsonl
    ROOT/tokenizer.json           byte-level BPE trained on the raw train splits
    ROOT/shards/manifest.json     dataprep's output (what `data=bench` trains on)
    ROOT/stats.json               MB, documents and tokens per domain and split
    ROOT/corpus.json              versions and hashes of inputs and outputs; written last (the commit point)
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

from dataprep.corpora.bench import readers as R
from dataprep.corpora.bench import sources as S
from dataprep.writer import file_lock

RECIPE = 1
SEED = 0
VOCAB = 8192
MB = 1_000_000
# domain: (cap in MB for train+val, dataprep kind, split unit: "doc" or "file" (chunks of one file stay together))
DOMAINS = {
    "prose": (None, "text", "doc"),      # Austen, ~4 MB
    "quotes": (None, "text", "doc"),     # fortunes, ~2.5 MB of short noisy records with duplicates
    "code": (8.0, "code", "file"),       # the standard library without its tests, 12 MB
    "math": (None, "math", "doc"),       # CHAMP problems (those not in the target), concepts and hints, 0.2 MB
    "dialogue": (5.0, "math", "doc"),    # CHAMP model conversations, 40 MB after exact dedup (math: Gopher's
                                         # repetition rules would drop most chats)
    "docs": (6.0, "code", "file"),       # Python docs' reST without howto/ (reST markup fails prose heuristics)
    "glossary": (3.0, "text", "doc"),    # FOLDOC, 5.2 MB
}
VAL_FRACTION, VAL_MAX_MB, VAL_MIN_DOCS = 0.05, 0.25, 8
TARGET_PROBLEMS = 0.25      # CHAMP problems held out of math and dialogue for the target
TARGET_DOCS = 100           # at most this many documents per target subtask
# target subtasks: related to a pool domain, never the same documents
SUBTASKS = {"math_solutions": "held-out CHAMP problems with step-by-step solutions (pool: math, dialogue)",
            "docs_howto": "the Python HOWTOs (howto/*.rst, left out of the docs domain)",
            "code_tests": "standard-library test modules (left out of the code domain)"}


def default_root() -> Path:
    base = os.environ.get("DATAFLEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dataflex")
    return Path(base) / "bench_corpus"


def rank_key(*parts) -> str:
    return hashlib.sha256(":".join(str(p) for p in (SEED,) + parts).encode()).hexdigest()


def split(domain: str, docs: list, cap_mb, unit: str) -> tuple[list, list]:
    """Deterministic seeded (train, val): documents (or source files, for `unit="file"`) in the order of
    a seeded hash of their id, taken up to the cap; the first ~5% (at most 0.25 MB, at least 8
    documents) of what is taken are validation."""
    def unit_of(doc_id):
        return doc_id.rsplit(":", 1)[0] if unit == "file" else doc_id

    order = sorted(range(len(docs)), key=lambda i: (rank_key(domain, unit_of(docs[i][0])), i))
    taken, size = [], 0
    for i in order:
        n = len(docs[i][1].encode())
        if cap_mb is not None and size + n > cap_mb * MB and taken:
            continue        # too big for what is left; smaller documents may still fit
        taken.append(docs[i])
        size += n
    n_val, val_bytes = 0, 0
    while n_val < len(taken) - 1 and (n_val < VAL_MIN_DOCS or (val_bytes < min(VAL_FRACTION * size, VAL_MAX_MB * MB))):
        val_bytes += len(taken[n_val][1].encode())
        n_val += 1
    val = taken[:n_val]
    # a file's chunks on one side only: move the chunks of the last val file that spill into train
    if unit == "file" and val:
        last = unit_of(val[-1][0])
        while n_val < len(taken) and unit_of(taken[n_val][0]) == last:
            val.append(taken[n_val])
            n_val += 1
    return taken[n_val:], val


def champ_split(champ: dict) -> tuple[list, list]:
    """(held-out problem ids for the target, the rest for the math and dialogue domains), seeded."""
    pids = sorted(champ["problems"], key=lambda p: rank_key("champ", p))
    n = round(TARGET_PROBLEMS * len(pids))
    return sorted(pids[:n]), sorted(pids[n:])


def write_jsonl(path: Path, docs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"text": text, "source": doc_id}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def gather(root: Path, skip_missing: bool, log) -> tuple[dict, dict, dict]:
    """({domain: docs}, {subtask: docs}, {source: version/hash}); raises S.MissingSource unless skip_missing."""
    from tqdm import tqdm

    cache = root / "sources"
    inputs, missing, debs = {}, [], {}
    for pkg in tqdm(S.DEBS, desc="bench corpus: sources", unit="pkg", file=sys.stderr):
        try:
            debs[pkg] = S.fetch_deb(pkg, cache)
            inputs[pkg] = {k: debs[pkg][k] for k in ("version", "sha256", "from")}
        except S.MissingSource as e:
            missing.append(str(e))
    champ = None
    try:
        champ_path = S.champ_json()
        champ = R.load_champ(champ_path)
        inputs["champ-dataset"] = {"version": S.package_version("champ-dataset"), "sha256": S.sha256(champ_path)}
    except S.MissingSource as e:
        missing.append(str(e))
    if "r-cran-janeaustenr" in debs and S.package_version("rdata") is None:
        missing.append("r-cran-janeaustenr: reading R's lazy-load database needs `pip install rdata`")
        del debs["r-cran-janeaustenr"]
    if missing and not skip_missing:
        raise S.MissingSource("bench corpus: missing " + "; ".join(missing) + ". Install what is named, or pass "
                              "--skip-missing to build from the rest.")
    for m in missing:
        log(f"bench corpus: skipped: {m}")
    inputs["python-stdlib"] = {"version": sys.version.split()[0], "path": str(S.stdlib())}
    inputs["rdata"] = {"version": S.package_version("rdata")}

    domains, targets = {}, {}
    if "r-cran-janeaustenr" in debs:
        rdx = S.pick(debs["r-cran-janeaustenr"]["files"], "janeaustenr/data/Rdata.rdx")
        domains["prose"] = lambda: R.austen(R.read_rdata_lazyload(rdx[0].parent))
    fortune_dirs = sorted({p.parent for pkg in ("fortunes", "fortunes-min") if pkg in debs
                           for p in S.pick(debs[pkg]["files"], ".dat")})
    if fortune_dirs:
        domains["quotes"] = lambda: (d for folder in fortune_dirs for d in R.fortunes(folder))
    domains["code"] = lambda: R.code(S.stdlib())
    targets["code_tests"] = lambda: R.code(S.stdlib(), tests=True)
    if champ is not None:
        held, pool = champ_split(champ)
        domains["math"] = lambda: R.champ_math(champ, pool)
        domains["dialogue"] = lambda: R.champ_dialogue(champ, pool)
        targets["math_solutions"] = lambda: ((f"champ:problem:{p}", R.champ_problem(champ["problems"][p])) for p in held)
    if S.PYDOC in debs:
        one = S.pick(debs[S.PYDOC]["files"], "_sources/library/index.rst.txt")[0]
        src = one.parents[1]
        domains["docs"] = lambda: R.rst_docs(src, exclude=("howto",))
        targets["docs_howto"] = lambda: R.rst_docs(src, include=("howto",))
    if "dict-foldoc" in debs:
        domains["glossary"] = lambda: R.foldoc(S.pick(debs["dict-foldoc"]["files"], "foldoc.dict.dz")[0])
    return {d: domains[d] for d in DOMAINS if d in domains}, targets, inputs


def train_tokenizer(files: list[Path], out: Path, vocab_size: int = VOCAB) -> None:
    """Byte-level BPE (NFC, ByteLevel pre-tokenizer and decoder, the 256-byte alphabet), as
    launch/build_corpus.py trains the embedded corpus's."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        for path in files:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer)
    tok.save(str(out))


def run_dataprep(data: dict, output_dir: Path, workers: int) -> str:
    """dataprep's default chain (configs/prep/default.yaml, as `launch/prep.py` composes it) on `data`."""
    from omegaconf import OmegaConf

    from dataprep.run import prepare
    from dataprep.tokenizer import share_root

    prep = OmegaConf.load(share_root() / "configs" / "prep" / "default.yaml")
    prep.output_dir = str(output_dir)
    prep.execution.workers = workers
    cfg = OmegaConf.to_container(OmegaConf.create({"data": data, "prep": prep}), resolve=True)
    return prepare(cfg["data"], cfg["prep"])


def stats(root: Path, manifest_path: str, domains: list, subtasks: list) -> dict:
    from dataprep.manifest import read_manifest
    from dataprep.tokenizer import load_tokenizer

    m = read_manifest(manifest_path)
    out = {"domains": {}, "target": {}}
    for d in domains:
        raw = {s: root / "raw" / d / f"{s}.jsonl" for s in ("train", "val")}
        kept = m["domains"].get(d, {"splits": {}})["splits"]
        texts = [json.loads(line)["text"] for p in raw.values() for line in open(p, encoding="utf-8")]
        out["domains"][d] = {"mb": round(sum(len(t.encode()) for t in texts) / MB, 2), "docs_read": len(texts),
                             **{f"{s}_docs": kept.get(s, {}).get("documents", 0) for s in ("train", "val")},
                             **{f"{s}_tokens": kept.get(s, {}).get("tokens", 0) for s in ("train", "val")}}
    tok = load_tokenizer(str(root / "tokenizer.json"))
    for t in subtasks:
        path = root / "target" / f"{t}.jsonl"
        texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
        out["target"][t] = {"mb": round(sum(len(x.encode()) for x in texts) / MB, 2), "docs": len(texts),
                            "tokens": sum(len(x) + 1 for x in tok.encode_batch(texts)), "what": SUBTASKS[t]}
    out["total_mb"] = round(sum(v["mb"] for v in out["domains"].values()), 2)
    return out


def table(st: dict) -> str:
    lines = [f"{'domain':<22}{'MB':>7}{'docs read':>11}{'train docs':>12}{'val docs':>10}{'train tokens':>14}"
             f"{'val tokens':>12}"]
    for d, v in st["domains"].items():
        lines.append(f"{d:<22}{v['mb']:>7.2f}{v['docs_read']:>11,}{v['train_docs']:>12,}{v['val_docs']:>10,}"
                     f"{v['train_tokens']:>14,}{v['val_tokens']:>12,}")
    lines.append(f"{'total':<22}{st['total_mb']:>7.2f}{sum(v['docs_read'] for v in st['domains'].values()):>11,}"
                 f"{sum(v['train_docs'] for v in st['domains'].values()):>12,}"
                 f"{sum(v['val_docs'] for v in st['domains'].values()):>10,}"
                 f"{sum(v['train_tokens'] for v in st['domains'].values()):>14,}"
                 f"{sum(v['val_tokens'] for v in st['domains'].values()):>12,}")
    for t, v in st["target"].items():
        lines.append(f"{'target/' + t:<22}{v['mb']:>7.2f}{v['docs']:>11,}{'':>12}{v['docs']:>10,}{'':>14}"
                     f"{v['tokens']:>12,}")
    return "\n".join(lines)


def marker(root: Path) -> dict | None:
    try:
        m = json.loads((root / "corpus.json").read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("recipe") == RECIPE and (root / "shards" / "manifest.json").is_file() else None


def build(root: Path | str | None = None, skip_missing: bool = False, workers: int | None = None, log=print) -> dict:
    """Build the corpus into `root` unless it is there already; returns its corpus.json."""
    from tqdm import tqdm

    root = Path(root or default_root()).expanduser().resolve()
    done = marker(root)
    if done is not None:
        log(f"bench corpus: already built in {root} (data=bench trains on {root / 'shards' / 'manifest.json'})")
        return done
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.json").unlink(missing_ok=True)
    domains, targets, inputs = gather(root, skip_missing, log)
    data = {"domains": {}, "tokenizer": str(root / "tokenizer.json")}
    for d in tqdm(domains, desc="bench corpus: domains", unit="domain", file=sys.stderr):
        cap, kind, unit = DOMAINS[d]
        train, val = split(d, list(domains[d]()), cap, unit)
        write_jsonl(root / "raw" / d / "train.jsonl", train)
        write_jsonl(root / "raw" / d / "val.jsonl", val)
        data["domains"][d] = {"train": str(root / "raw" / d / "train.jsonl"),
                              "val": str(root / "raw" / d / "val.jsonl"), "kind": kind}
    for t in targets:
        docs = sorted(targets[t](), key=lambda doc: rank_key("target", t, doc[0]))[:TARGET_DOCS]
        write_jsonl(root / "target" / f"{t}.jsonl", sorted(docs))
    log("bench corpus: training the tokenizer")
    train_tokenizer([root / "raw" / d / "train.jsonl" for d in domains], root / "tokenizer.json")
    log("bench corpus: dataprep (configs/prep/default.yaml)")
    manifest = run_dataprep(data, root / "shards", workers or min(2, os.cpu_count() or 1))
    st = stats(root, manifest, list(domains), list(targets))
    st["build_seconds"] = round(time.time() - t0, 1)
    (root / "stats.json").write_text(json.dumps(st, indent=2) + "\n")
    outputs = sorted([*(root / "raw").glob("*/*.jsonl"), *(root / "target").glob("*.jsonl"), root / "tokenizer.json",
                      Path(manifest)])
    done = {"recipe": RECIPE, "seed": SEED, "vocab_size": VOCAB, "inputs": inputs, "domains": list(domains),
            "target": list(targets), "skipped": sorted(set(DOMAINS) - set(domains)),
            "outputs": {str(p.relative_to(root)): S.sha256(p) for p in outputs}}
    tmp = root / "corpus.json.tmp"
    tmp.write_text(json.dumps(done, indent=2) + "\n")
    os.replace(tmp, root / "corpus.json")
    log(table(st))
    log(f"bench corpus: built in {st['build_seconds']:.0f} s into {root}; train on it with data=bench")
    return done


def ensure(root: str | None = None, skip_missing: bool = False) -> Path:
    """The corpus in `root`, built on first use: local rank 0 builds it holding ROOT.lock (a second launch
    waits for the lock, then finds it built); the other ranks wait for its corpus.json."""
    root = Path(root or default_root()).expanduser().resolve()
    if marker(root) is not None:
        return root
    if int(os.environ.get("LOCAL_RANK", "0") or 0) != 0:
        print(f"dataflex: waiting for the benchmark corpus {root} (built by local rank 0)", file=sys.stderr)
        while marker(root) is None:
            time.sleep(1)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        if marker(root) is None:
            print(f"dataflex: building the benchmark corpus into {root} (first use; "
                  "`python launch/bench_corpus.py` does it ahead)", file=sys.stderr)
            build(root, skip_missing, log=lambda s: print(s, file=sys.stderr))
    return root
