"""launch/prep.py and launch/where.py as users run them: Hydra composition with --config-dir, errors
that name the YAML file, line and key, and tracing a training sample back to its source line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.testing import planted_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "data", "default", "tokenizer.json")


def _run(args, cwd):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _config_dir(tmp_path, train, val):
    cdir = tmp_path / "conf"
    (cdir / "data").mkdir(parents=True)
    (cdir / "data" / "mine.yaml").write_text(
        "# my corpus\n"
        "domains:\n"
        f"  prose:\n    train: {train}\n    val: {val}\n"
        f"tokenizer: {TOKENIZER}\n")
    return cdir


def test_missing_file_error_names_yaml_line_and_key(tmp_path):
    planted_jsonl(str(tmp_path / "val.jsonl"), n_unique=5)
    cdir = _config_dir(tmp_path, "corpus/missing.jsonl", str(tmp_path / "val.jsonl"))
    r = _run([os.path.join(REPO, "launch", "prep.py"), "--config-dir", str(cdir), "data=mine",
              f"prep.output_dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()[-1]
    assert "data.domains.prose.train: input not found: 'corpus/missing.jsonl'" in err
    assert err.startswith("prep: error: " + os.path.join("conf", "data", "mine.yaml") + ":4: "), err


def test_prep_then_where(tmp_path):
    counts = planted_jsonl(str(tmp_path / "corpus" / "train.jsonl"), n_unique=30, seed=3)
    planted_jsonl(str(tmp_path / "corpus" / "val.jsonl"), n_unique=6, seed=4)
    cdir = _config_dir(tmp_path, "corpus/train.jsonl", "corpus/val.jsonl")
    out = tmp_path / "prepared"
    r = _run([os.path.join(REPO, "launch", "prep.py"), "--config-dir", str(cdir), "data=mine",
              f"prep.output_dir={out}", "prep.execution.workers=1", "prep.execution.progress=false"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["domains"]["prose"]["splits"]["train"]["documents"] == counts["unique"]
    steps = {s["name"]: s for s in m["steps"]}
    assert steps["exact_dedup"]["dropped"] == {"exact_duplicate": 3 + 3}  # planted in train and in val
    assert steps["minhash_dedup"]["dropped"] == {"near_duplicate": 2 + 2}
    assert m["config"]["data"]["tokenizer"] == TOKENIZER
    # a training run directory as training writes it
    prov = pq.read_table(out / "provenance.parquet").to_pylist()
    target = prov[7]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(f"data:\n  manifest: {out / 'manifest.json'}\n")
    pq.write_table(pa.table({"sample_id": pa.array([0, 1, 2], pa.int64()), "domain": ["prose"] * 3,
                             "split": ["train"] * 3, "doc_id": [prov[0]["doc_id"], target["doc_id"], prov[2]["doc_id"]],
                             "chunk": [0, 1, 0]}), run_dir / "samples.parquet")
    r = _run([os.path.join(REPO, "launch", "where.py"), str(run_dir), "1", "--json"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["source"] == "corpus/train.jsonl" and info["line"] == target["line"]
    assert info["shard"] == target["shard"] and info["index_in_shard"] == target["index"]
    assert info["doc_id"] == target["doc_id"] and info["domain"] == "prose" and info["chunk"] == 1
    r = _run([os.path.join(REPO, "launch", "where.py"), str(run_dir), "1"], cwd=tmp_path)
    assert f"corpus/train.jsonl:{target['line']}" in r.stdout
    r = _run([os.path.join(REPO, "launch", "where.py"), str(run_dir), "99"], cwd=tmp_path)
    assert r.returncode == 2 and "sample_id 99" in r.stderr


def test_prep_without_a_tokenizer_uses_the_embedded_one_as_training_does(tmp_path):
    planted_jsonl(str(tmp_path / "train.jsonl"), n_unique=20)
    planted_jsonl(str(tmp_path / "val.jsonl"), n_unique=5, seed=3)
    cdir = tmp_path / "conf"
    (cdir / "data").mkdir(parents=True)
    (cdir / "data" / "mine.yaml").write_text(
        f"domains:\n  prose:\n    train: {tmp_path / 'train.jsonl'}\n    val: {tmp_path / 'val.jsonl'}\n")
    r = _run([os.path.join(REPO, "launch", "prep.py"), "--config-dir", str(cdir), "data=mine", "prep=minimal",
              f"prep.output_dir={tmp_path / 'out'}", "prep.execution.workers=1"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    import hashlib
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(open(TOKENIZER, "rb").read()).hexdigest()
