"""dataprep end to end: planted problems give exact counts, Megatron reads the shards back, reruns and
crashed-then-resumed runs are byte-identical, and the manifest hooks training uses work."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataprep.manifest import load_prepared, read_manifest, tokenizer_path
from dataprep.run import prepare
from dataprep.testing import make_doc, planted_jsonl, vocabulary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "default", "tokenizer.json")

STEPS = [
    {"_target_": "dataprep.steps.normalize.Normalize"},
    {"_target_": "dataprep.steps.length.LengthFilter", "min_chars": 20, "min_words": 5},
    {"_target_": "dataprep.steps.quality.QualityFilter"},
    {"_target_": "dataprep.steps.repetition.RepetitionFilter"},
    {"_target_": "dataprep.steps.exact_dedup.ExactDedup"},
    {"_target_": "dataprep.steps.minhash_dedup.MinHashDedup", "threshold": 0.8},
    {"_target_": "dataprep.steps.tokenize.Tokenize", "tokenizer": TOKENIZER},
]


def prep_cfg(out, workers=1, executor="local", parallel_write=True, **kw):
    cfg = {"output_dir": str(out), "text_key": "text", "text_split": "paragraph", "shard_size_mb": 0.002,
           "keep_work": False, "steps": STEPS,
           "execution": {"executor": executor, "workers": workers, "progress": False,
                         "parallel_write": parallel_write}}
    cfg.update(kw)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two domains, every reader format, planted duplicates and malformed records."""
    root = tmp_path_factory.mktemp("corpus")
    counts = planted_jsonl(str(root / "alpha" / "a1.jsonl"), n_unique=40, seed=1)
    rng = random.Random(7)
    vocab = vocabulary(seed=7)
    docs = [make_doc(rng, vocab, 60) for _ in range(30)]
    with gzip.open(root / "alpha" / "a2.jsonl.gz", "wt") as f:  # 10 docs, 1 exact dup of a 'beta' doc
        for d in docs[:10]:
            f.write(json.dumps({"text": d}) + "\n")
    import zstandard
    with open(root / "alpha_val.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress("".join(json.dumps({"text": d}) + "\n" for d in docs[10:15]).encode()))
    pq.write_table(pa.table({"text": docs[15:25] + [None, docs[0]]}), root / "beta.parquet")  # 1 null, 1 dup
    (root / "beta_txt").mkdir()
    (root / "beta_txt" / "p.txt").write_text("\n\n".join(docs[25:29]) + "\n\n\n")  # 4 paragraphs
    data = {"domains": {"alpha": {"train": [str(root / "alpha" / "a1.jsonl"), str(root / "alpha" / "a2.jsonl.gz")],
                                  "val": str(root / "alpha_val.jsonl.zst")},
                        "beta": {"train": [str(root / "beta.parquet"), str(root / "beta_txt")],
                                 "val": str(root / "alpha" / "a*.jsonl")}},
            "tokenizer": TOKENIZER}
    # beta/val re-reads a1.jsonl: everything in it is a duplicate of alpha/train (train wins over val),
    # except its malformed records, which are counted again.
    return root, data, counts


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    root, data, counts = corpus
    out = tmp_path_factory.mktemp("ref")
    path = prepare(data, prep_cfg(out, workers=2))
    return out, path


def _shard_hashes(m):
    return [(s["prefix"], s["bin"]["sha256"], s["idx"]["sha256"]) for s in m["shards"]]


def test_counts_per_reason(corpus, reference):
    root, data, c = corpus
    m = read_manifest(reference[1])
    steps = {s["name"]: s for s in m["steps"]}
    malformed = {k: 2 * c[k] for k in ("bad_json", "missing_text", "non_string_text", "empty_text", "not_an_object")}
    malformed["missing_text"] += 1  # the Parquet null
    assert steps["read"]["dropped"] == malformed
    records = 2 * c["records"] + 10 + 5 + 12 + 4
    assert steps["read"]["docs_in"] == records
    good = records - sum(malformed.values())
    assert steps["read"]["docs_out"] == good
    assert steps["length_filter"]["dropped"] == {} and steps["quality_filter"]["dropped"] == {}
    # alpha/train: 3 planted exact dups; beta/train: docs[0] again; beta/val: all 45 good docs of a1 again
    n_a1_good = c["unique"] + c["exact_duplicate"] + c["near_duplicate"]
    assert steps["exact_dedup"]["dropped"] == {"exact_duplicate": c["exact_duplicate"] + 1 + n_a1_good}
    assert steps["minhash_dedup"]["dropped"] == {"near_duplicate": c["near_duplicate"]}
    assert steps["tokenize"]["docs_out"] == good - steps["exact_dedup"]["dropped"]["exact_duplicate"] - 2
    kept = c["unique"] + 10 + 5 + 10 + 4
    assert m["totals"]["documents"] == kept == steps["tokenize"]["docs_out"]
    assert m["domains"]["beta"]["splits"]["val"]["documents"] == 0
    # each step's out is the next step's in
    for a, b in zip(m["steps"], m["steps"][1:]):
        assert a["docs_out"] == b["docs_in"]
    # the rejects file holds every drop, each with file and line
    rejects = [json.loads(x) for x in open(os.path.join(reference[0], "rejects.jsonl"))]
    assert len(rejects) == records - kept == m["rejects"]["rows"]
    by = {}
    for r in rejects:
        by[r["reason"]] = by.get(r["reason"], 0) + 1
        assert r["source"] and ("line" in r or "row" in r)
    assert by == m["totals"]["dropped"]
    bad = next(r for r in rejects if r["reason"] == "bad_json")
    assert bad["source"].endswith("a1.jsonl") and bad["line"] > 0 and "broken json" in bad["text"]


def test_manifest_lineage(corpus, reference):
    out, path = reference
    m = read_manifest(path)
    assert {i["format"] for i in m["inputs"]} == {"jsonl", "parquet", "text"}
    for i in m["inputs"]:
        assert len(i["sha256"]) == 64 and i["bytes"] > 0
    assert m["tokenizer"]["vocab_size"] > 0 and os.path.isfile(tokenizer_path(path))
    from megatron.core.datasets.indexed_dataset import DType
    assert m["format"]["dtype"] == np.dtype(DType.optimal_dtype(m["tokenizer"]["vocab_size"])).name
    assert np.dtype(DType.optimal_dtype(70000)).name == "int32"
    assert len(m["config_sha256"]) == 64 and m["config"]["prep"]["steps"][0]["_target_"].endswith("Normalize")
    assert len(m["shards"]) > 2  # tiny shard size: several shards per group
    for s in m["shards"]:
        assert {"prefix", "domain", "split", "documents", "tokens", "bin", "idx"} <= set(s)
    prov = pq.read_table(os.path.join(out, "provenance.parquet")).to_pylist()
    assert len(prov) == m["totals"]["documents"] == len({p["doc_id"] for p in prov})  # none lost, none twice
    txt = next(p for p in prov if p["source"].endswith("p.txt"))
    assert txt["line_kind"] == "line" and txt["line"] in (1, 3, 5, 7)
    pqrow = next(p for p in prov if p["source"].endswith(".parquet"))
    assert pqrow["line_kind"] == "row"


def test_megatron_reads_back_same_tokens(corpus, reference):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from dataprep.steps.normalize import Normalize
    from dataprep.tokenizer import load_tokenizer

    root, data, _ = corpus
    out, path = reference
    tok = load_tokenizer(TOKENIZER)
    norm = Normalize()
    texts = {}
    for line_no, line in enumerate(open(root / "alpha" / "a1.jsonl"), start=1):
        try:
            t = json.loads(line)["text"]
        except Exception:
            continue
        if isinstance(t, str):
            texts[line_no] = norm.normalize(t)
    prov = pq.read_table(os.path.join(out, "provenance.parquet")).to_pylist()
    checked = 0
    cache = {}
    for p in prov:
        if p["source"].endswith("a1.jsonl"):
            ds = cache.setdefault(p["shard"], IndexedDataset(os.path.join(out, p["shard"])))
            want = tok.encode(texts[p["line"]]) + [tok.eos_id]
            assert np.array(ds[p["index"]]).tolist() == want
            checked += 1
    assert checked == 40
    loaded = load_prepared(path)
    assert set(loaded) == {"alpha", "beta"} and loaded["beta"]["val"] == []
    m = read_manifest(path)
    for d, v in m["domains"].items():
        for s, tot in v["splits"].items():
            assert len(loaded[d][s]) == tot["documents"]
            assert sum(len(t) for _, t in loaded[d][s]) == tot["tokens"]
            assert all(t[-1] == tok.eos_id for _, t in loaded[d][s])
    doc_id, toks = loaded["alpha"]["train"][0]
    assert doc_id.startswith("alpha/train/0000/a1.jsonl:") and toks.dtype == np.dtype(m["format"]["dtype"])


def test_rerun_is_identical(corpus, reference, tmp_path):
    root, data, _ = corpus
    path = prepare(data, prep_cfg(tmp_path / "out", workers=1))  # other worker count, in process
    assert open(path, "rb").read() == open(reference[1], "rb").read()
    path = prepare(data, prep_cfg(tmp_path / "out2", workers=2, parallel_write=False))
    assert open(path, "rb").read() == open(reference[1], "rb").read()
    for name in ("provenance.parquet", "rejects.jsonl"):
        assert open(tmp_path / "out2" / name, "rb").read() == open(os.path.join(reference[0], name), "rb").read()


@pytest.mark.parametrize("fault", ["task:5@3", "group:0@1"])
def test_killed_then_resumed_is_identical(corpus, reference, tmp_path, monkeypatch, fault):
    root, data, _ = corpus
    out = tmp_path / "out"
    monkeypatch.setenv("DATAPREP_FAULT", fault)
    with pytest.raises(BrokenProcessPool):
        prepare(data, prep_cfg(out, workers=2))
    assert not (out / "manifest.json").exists()
    assert any((out / ".work").rglob("*.done.json"))  # some work survived the crash and is reused
    monkeypatch.delenv("DATAPREP_FAULT")
    path = prepare(data, prep_cfg(out, workers=2))
    assert open(path, "rb").read() == open(reference[1], "rb").read()
    assert _shard_hashes(read_manifest(path)) == _shard_hashes(read_manifest(reference[1]))


def test_ray_matches_local(corpus, reference, tmp_path):
    import ray  # noqa: F401  (a dev requirement: a broken install fails, never skips)
    root, data, _ = corpus
    path = prepare(data, prep_cfg(tmp_path / "out", workers=2, executor="ray"))
    assert _shard_hashes(read_manifest(path)) == _shard_hashes(read_manifest(reference[1]))
    assert open(path, "rb").read() == open(reference[1], "rb").read()


def test_missing_input_names_file_and_key(tmp_path):
    from dataprep.readers import InputError

    data = {"domains": {"prose": {"train": str(tmp_path / "nope.jsonl"), "val": str(tmp_path / "nope.jsonl")}},
            "tokenizer": TOKENIZER}
    with pytest.raises(InputError, match=r"data\.domains\.prose\.train: input not found: .*nope\.jsonl"):
        prepare(data, prep_cfg(tmp_path / "out"))
    data["domains"]["prose"]["train"] = [str(tmp_path / "x*.jsonl")]
    with pytest.raises(InputError, match=r"data\.domains\.prose\.train: no input matches"):
        prepare(data, prep_cfg(tmp_path / "out"))


def test_bad_step_names_key(tmp_path, corpus):
    _, data, _ = corpus
    cfg = prep_cfg(tmp_path / "out", steps=[{"_target_": "dataprep.steps.nope.Nope"}] + STEPS)
    with pytest.raises(ValueError, match=r"prep\.steps\[0\] \(_target_: dataprep\.steps\.nope\.Nope\)"):
        prepare(data, cfg)
    cfg = prep_cfg(tmp_path / "out", steps=STEPS[:-1])
    with pytest.raises(ValueError, match="tokenize"):
        prepare(data, cfg)


def test_an_input_edited_after_a_crash_is_read_again(corpus, reference, tmp_path, monkeypatch):
    """A finished task's cached output is reused only while its input is unchanged (size, time, sha256)."""
    import shutil
    root, data, _ = corpus
    copy = tmp_path / "corpus"
    shutil.copytree(root, copy)
    data = json.loads(json.dumps(data).replace(str(root), str(copy)))
    out = tmp_path / "out"
    monkeypatch.setenv("DATAPREP_FAULT", "group:0@1")   # a shard writer dies: every read task has finished
    with pytest.raises(BrokenProcessPool):
        prepare(data, prep_cfg(out, workers=2))
    a1_size = os.path.getsize(copy / "alpha" / "a1.jsonl")
    assert any(json.loads(p.read_text())["bytes"] == a1_size for p in (out / ".work").rglob("*.done.json"))
    monkeypatch.delenv("DATAPREP_FAULT")
    rng = random.Random(99)
    with open(copy / "alpha" / "a1.jsonl", "a") as f:         # a finished task's input changes meanwhile
        f.write(json.dumps({"text": make_doc(rng, vocabulary(seed=99), 60)}) + "\n")
    resumed = read_manifest(prepare(data, prep_cfg(out, workers=2)))
    fresh = read_manifest(prepare(data, prep_cfg(tmp_path / "fresh", workers=2)))
    assert _shard_hashes(resumed) == _shard_hashes(fresh)
    a1 = next(i for i in resumed["inputs"] if i["path"].endswith("a1.jsonl") and i["split"] == "train")
    assert a1["sha256"] == hashlib.sha256((copy / "alpha" / "a1.jsonl").read_bytes()).hexdigest()


def test_killing_the_driver_kills_its_workers(tmp_path):
    """kill -9 of a prep driver leaves no worker process behind."""
    import signal
    import subprocess
    import sys
    import time
    script = tmp_path / "driver.py"
    script.write_text(
        "import time\n"
        "from dataprep.executors import LocalExecutor\n"
        "def slow(x):\n    time.sleep(60)\n"
        "with LocalExecutor(workers=2, progress=False) as ex:\n"
        "    import os, multiprocessing\n"
        "    print(' '.join(str(p.pid) for p in multiprocessing.active_children()), flush=True)\n"
        "    ex.map(slow, [1, 2], 'x')\n")
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in driver.stdout.readline().split()]
    assert len(workers) >= 2
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 10
    alive = workers
    while alive and time.time() < deadline:
        alive = [p for p in alive if os.path.exists(f"/proc/{p}") and
                 "Z" not in open(f"/proc/{p}/stat").read().split(")")[-1].split()[0]]
        time.sleep(0.2)
    assert not alive, f"workers {alive} outlived their driver"
