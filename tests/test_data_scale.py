"""Data at scale (the sampler's side is in test_sampler.py): the raw-file token cache (fresh = cached, killed builds resume,
concurrent launches build once), memory-mapped samples equal to the in-memory chunking, and sample ids
resolved on demand to their source line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataflex.data.cache import MARKER
from dataflex.data.domains import MixtureDataset, load_domains
from dataflex.data.provenance import sample_table
from dataflex.data.samples import build_samples
from dataflex.utils.errors import DataConfigError

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = str(ROOT / "data" / "default" / "tokenizer.json")


def _corpus(tmp_path: Path, docs: int = 120) -> dict:
    rng = np.random.default_rng(0)
    words = "the of data model sample token shard cache index train loss weight domain".split()
    data = {"domains": {}, "tokenizer": TOKENIZER, "cache": str(tmp_path / "cache")}
    for name in ("web", "books"):
        folder = tmp_path / "raw" / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", docs), ("val", docs // 4)):
            lines = [json.dumps({"text": " ".join(rng.choice(words, rng.integers(5, 300)))}) for _ in range(n)]
            (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
        data["domains"][name] = {"train": str(folder / "train.jsonl"), "val": str(folder / "val.jsonl")}
    return data


def _shard_bytes(cache_root: Path) -> dict:
    (folder,) = [p for p in cache_root.iterdir() if p.is_dir()]
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in (".bin", ".idx", ".parquet") or p.name == MARKER}


def test_cached_shards_equal_a_fresh_build_and_the_in_memory_samples(tmp_path):
    data = _corpus(tmp_path)
    first = load_domains(data, seq_len=32, max_val_samples=5, progress=False)
    again = load_domains(data, seq_len=32, max_val_samples=5, progress=False)     # from the cache
    fresh = load_domains(dict(data, cache=str(tmp_path / "fresh")), seq_len=32, progress=False)
    assert _shard_bytes(tmp_path / "cache") == _shard_bytes(tmp_path / "fresh")
    for name in ("web", "books"):
        ref = build_samples(data["domains"][name]["train"], first.tokenizer, 32, "k")
        for d in (first, again, fresh):
            rows = d.train[name].rows(np.arange(len(ref)))
            assert len(d.train[name]) == len(ref)
            assert all(torch.equal(a, b) for a, b in zip(rows, (ref.input_ids, ref.labels, ref.loss_mask)))
        assert len(first.val[name]) == 5 and len(fresh.val[name]) > 5      # capped by max_val_samples
    mix = MixtureDataset(first.train)
    ids = torch.tensor([0, len(mix) - 1, mix.sizes[0], 3])
    assert mix.domain[ids].tolist() == [0, 1, 1, 0] and (mix.domain == 1).sum() == mix.sizes[1]
    assert torch.equal(mix.batch(ids)["input_ids"][2], first.train["books"].input_ids[0])


SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
from dataflex.data.config import _groups
from dataflex.data.cache import ensure_cache
from dataprep.tokenizer import load_tokenizer
data = json.loads({data!r})
folder, cache, built = ensure_cache(_groups(data), load_tokenizer(data["tokenizer"]), data["cache"], progress=False)
print(json.dumps({{"built": built, "docs": {{g["name"] + "/" + g["split"]: g["documents"] for g in cache["groups"]}}}}))
"""


def _script(data):
    return [sys.executable, "-c", SCRIPT.format(root=str(ROOT), data=json.dumps(data))]


def test_killed_build_resumes_to_identical_shards(tmp_path):
    data = _corpus(tmp_path)
    env = dict(os.environ, DATAFLEX_CACHE_FAULT=str(120 + 30 + 40))     # dies inside the third group
    proc = subprocess.run(_script(data), env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert not (folder / MARKER).exists()
    assert (folder / "web" / "train" / ".done.json").exists() and not (folder / "books" / "train" / ".done.json").exists()
    with pytest.raises(FileNotFoundError):    # the half-built cache is never used
        (folder / MARKER).read_text()
    load_domains(data, seq_len=32, progress=False)                       # resumes
    load_domains(dict(data, cache=str(tmp_path / "fresh")), seq_len=32, progress=False)
    assert _shard_bytes(tmp_path / "cache") == _shard_bytes(tmp_path / "fresh")


def test_two_launches_build_the_cache_once(tmp_path):
    data = _corpus(tmp_path, docs=400)
    procs = [subprocess.Popen(_script(data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["docs"] == results[1]["docs"] and results[0]["docs"]["web/train"] == 400


def test_other_ranks_wait_for_the_marker(tmp_path, monkeypatch):
    data = _corpus(tmp_path, docs=20)
    monkeypatch.setenv("LOCAL_RANK", "1")
    import threading
    box = {}
    t = threading.Thread(target=lambda: box.update(d=load_domains(data, seq_len=32)))
    t.start()
    t.join(1.0)
    assert t.is_alive() and "d" not in box         # waits: local rank 0 has not built it
    monkeypatch.setenv("LOCAL_RANK", "0")
    load_domains(data, seq_len=32, progress=False)
    t.join(30)
    assert len(box["d"].train["web"]) > 0


def test_malformed_input_names_file_line_and_key(tmp_path):
    data = _corpus(tmp_path, docs=8)
    bad = tmp_path / "raw" / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    data["domains"]["web"]["train"] = str(bad)
    with pytest.raises(DataConfigError, match=rf"{bad}:2: record has no string 'text' field \(data.domains.web.train\)"):
        load_domains(data, seq_len=32, progress=False)
    data["domains"]["web"]["train"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataConfigError, match="data.domains.web.train: input not found"):
        load_domains(data, seq_len=32, progress=False)


def test_raw_file_samples_resolve_to_their_source_line(tmp_path):
    from dataflex.data.provenance import where_sample

    data = _corpus(tmp_path, docs=30)
    domains = load_domains(data, seq_len=32, progress=False)
    mix = MixtureDataset(domains.train)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data.json").write_text(json.dumps(mix.describe()))
    table = sample_table(mix, torch.arange(len(mix)))
    for sid in (0, len(mix) - 1, mix.sizes[0] + 7):
        info = where_sample(str(run_dir), sid)
        assert info["doc_id"] == table["doc_id"][sid] == f"{info['source']}:{info['line']}"
        assert info["domain"] == table["domain"][sid] and info["chunk"] == table["chunk"][sid]
        text = json.loads(Path(info["source"]).read_text().splitlines()[info["line"] - 1])["text"]
        tokens = domains.tokenizer.encode(text) + [domains.tokenizer.eos_id]
        row = mix.input_ids[sid]
        start = info["chunk"] * 32
        expect = torch.tensor(tokens[start:start + 32])
        assert torch.equal(row[:len(expect)], expect)
    with pytest.raises(KeyError, match="sample_id"):
        where_sample(str(run_dir), len(mix))
