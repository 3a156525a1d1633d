"""The benchmark corpus (dataflex/corpus/, launch/bench_corpus.py, configs/data/bench.yaml): its readers
on tiny fixtures, its seeded splits, target subtasks in a data config and the `build:` hook; the slow
test builds the whole corpus from the Debian packages and trains five steps on it with `data=bench`."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dataflex.data.domains import load_domains
from dataflex.session.signals import as_mixture
from dataprep.corpora.bench import pipeline as B
from dataprep.corpora.bench import readers as R

ROOT = Path(__file__).resolve().parents[1]


def test_fortunes_split_on_percent_lines_and_skip_index_files(tmp_path):
    (tmp_path / "art").write_text("First fortune,\n\ttwo lines.\n%\nSecond.\n  -- Someone\n%\n%\nThird\n")
    (tmp_path / "art.dat").write_bytes(b"\x00\x00\x00\x02%binary")
    (tmp_path / "art.u8").write_text("First fortune\n%\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "law").write_text("A 50% chance % is not a separator\n%\n")
    docs = list(R.fortunes(tmp_path))
    assert [t for _, t in docs] == ["First fortune,\n\ttwo lines.", "Second.\n  -- Someone", "Third",
                                    "A 50% chance % is not a separator"]
    assert docs[0][0] == "fortunes:art:0" and len({i for i, _ in docs}) == 4


def test_foldoc_entries_start_at_unindented_lines(tmp_path):
    path = tmp_path / "foldoc.dict.dz"
    text = ("00-database-info\n   header text\n"
            "ABC\n\n   <language> An imperative language\n   designed at CWI.\n\n   See {Python}.\n\n"
            "Python\n\n   <language> A scripting language.\n"
            "Empty\n")
    with gzip.open(path, "wt") as f:
        f.write(text)
    docs = list(R.foldoc(path))
    assert docs == [("foldoc:ABC", "ABC\n\n<language> An imperative language designed at CWI.\n\nSee {Python}."),
                    ("foldoc:Python", "Python\n\n<language> A scripting language.")]


def _champ():
    conv = {"messages": [{"role": "System", "text": "You are an expert."}, {"role": "User", "text": "Solve 1+1."},
                         {"role": "Model.GPT-4", "text": "2"}]}
    other = {"messages": conv["messages"][:2] + [{"role": "Model.GPT-4", "text": "It is 2."}]}
    problems = {f"P_{i}": {"_text": f"Problem {i}?", "category": "Algebra", "_answer": str(i),
                           "solution": {"steps": [{"_text": "Think."}, {"_text": f"So {i}."}]},
                           "conversations": {"A|0-Shot": conv, "B|5-Shot": dict(conv), "C|1/3 Soln": other}}
                for i in range(8)}
    return {"problems": problems, "concepts": {"C_x": {"_text": "A concept.", "name": None, "category": "Algebra"}},
            "hints": {"H_1": {"_text": "A hint."}}}


def test_champ_dialogue_dedupes_and_math_renders_solutions():
    champ = _champ()
    dialogue = list(R.champ_dialogue(champ, ["P_0", "P_1"]))
    assert len(dialogue) == 2                   # the same turns under three settings of two problems: 2 distinct
    assert dialogue[0][1] == "System: You are an expert.\n\nUser: Solve 1+1.\n\nModel: 2"
    math = dict(R.champ_math(champ, ["P_3"]))
    assert math["champ:problem:P_3"] == "Problem (Algebra): Problem 3?\n\nSolution:\n1. Think.\n2. So 3.\n\nAnswer: 3"
    assert set(math) == {"champ:problem:P_3", "champ:concept:C_x", "champ:hint:H_1"}
    held, pool = B.champ_split(champ)           # target problems never in the pool
    assert len(held) == 2 and not set(held) & set(pool) and sorted(held + pool) == sorted(champ["problems"])
    assert B.champ_split(champ) == (held, pool)


def test_code_and_rst_readers_keep_tests_and_howtos_apart(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "decoder.py").write_text("def f():\n    pass\n\n\ndef g():\n    pass\n")
    (tmp_path / "test" / "test_json.py").write_text("def test():\n    assert 1\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "x.py").write_text("x = 1\n")
    assert [i for i, _ in R.code(tmp_path)] == ["stdlib:json/decoder.py:0"]
    assert [i for i, _ in R.code(tmp_path, tests=True)] == ["stdlib:test/test_json.py:0"]
    for top in ("howto", "library"):
        (tmp_path / "src" / top).mkdir(parents=True)
        (tmp_path / "src" / top / "a.rst.txt").write_text(f"{top}\n=====\n\nBody.\n")
    assert [i for i, _ in R.rst_docs(tmp_path / "src", exclude=("howto",))] == ["pydoc:library/a.rst.txt:0"]
    assert [i for i, _ in R.rst_docs(tmp_path / "src", include=("howto",))] == ["pydoc:howto/a.rst.txt:0"]


def test_splits_are_seeded_capped_and_keep_a_files_chunks_together():
    docs = [(f"f{i // 3}:{i % 3}", "x" * (100 + i)) for i in range(300)]
    train, val = B.split("code", docs, 0.02, "file")
    assert (train, val) == B.split("code", list(docs), 0.02, "file")                # seeded: the same twice
    assert (train, val) != B.split("docs", list(docs), 0.02, "file")                # each domain its own order
    size = sum(len(t) for _, t in train + val)
    assert size <= 0.02 * B.MB and len(val) >= B.VAL_MIN_DOCS and train
    files = lambda part: {i.rsplit(":", 1)[0] for i, _ in part}   # noqa: E731
    assert not files(train) & files(val)
    train2, val2 = B.split("prose", docs, None, "doc")                              # no cap: every document
    assert len(train2) + len(val2) == 300 and 0.05 <= sum(len(t) for _, t in val2) / sum(len(t) for _, t in docs) < 0.06


def test_target_subtasks_load_as_named_sets_and_build_hook_runs_first(tmp_path):
    sub = {}
    for name in ("alpha", "beta"):
        sub[name] = tmp_path / f"{name}.jsonl"
        sub[name].write_text("".join(json.dumps({"text": f"{name} document number {i} " * 8}) + "\n"
                                     for i in range(5)))
    data = {"build": {"_target_": "test_bench_corpus.record_build", "where": str(tmp_path)},
            "domains": {"prose": {"train": "data/default/prose/val.jsonl"}},
            "target": {n: {"val": str(p)} for n, p in sub.items()}, "cache": str(tmp_path / "cache")}
    domains = load_domains(OmegaConf.create(data), seq_len=32)
    assert (tmp_path / "built").read_text() == "yes"
    assert isinstance(domains.target, dict) and sorted(domains.target) == ["alpha", "beta"]
    assert as_mixture("target", domains.target).names == ["alpha", "beta"]      # LESS: one subtask each
    single = load_domains({**data, "build": None, "target": {"val": str(sub["alpha"])}}, seq_len=32)
    assert len(single.target) == len(domains.target["alpha"])


def record_build(where):
    (Path(where) / "built").write_text("yes")


def test_bench_config_resolves_under_the_cache_root(monkeypatch):
    monkeypatch.setenv("DATAFLEX_CACHE", "/somewhere")
    cfg = OmegaConf.create({"data": OmegaConf.load(ROOT / "configs" / "data" / "bench.yaml")})
    data = OmegaConf.to_container(cfg, resolve=True)["data"]
    assert data["build"] == {"_target_": "dataprep.corpora.bench.ensure", "root": "/somewhere/bench_corpus"}
    assert data["manifest"] == "/somewhere/bench_corpus/shards/manifest.json"
    assert data["target"]["math_solutions"]["val"] == "/somewhere/bench_corpus/target/math_solutions.jsonl"
    assert set(data["target"]) == set(B.SUBTASKS)


def _have_debs() -> bool:
    return shutil.which("apt-get") is not None and shutil.which("dpkg-deb") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _have_debs(), reason="needs apt-get and dpkg-deb to fetch the Debian sources")
def test_built_on_first_use_then_trains_five_steps(tmp_path):
    env = dict(os.environ, DATAFLEX_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    run = subprocess.run([sys.executable, str(ROOT / "launch" / "train.py"), "data=bench", "backend=torch",
                          "logger=none", "trainer.max_steps=5", "trainer.eval_every=5", "trainer.global_batch_size=8",
                          "trainer.max_val_samples=4", "model.seq_len=64", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    root = tmp_path / "cache" / "bench_corpus"
    stats = json.loads((root / "stats.json").read_text())
    assert set(stats["domains"]) == set(B.DOMAINS) and set(stats["target"]) == set(B.SUBTASKS)
    assert 20 <= stats["total_mb"] <= 35
    sizes = [v["mb"] for v in stats["domains"].values()]
    assert max(sizes) > 10 * min(sizes)                                       # uneven on purpose
    assert all(v["val_docs"] > 0 and v["train_docs"] > 0 for v in stats["domains"].values())
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 5 and set(summary["val_loss"]) == set(B.DOMAINS)
    again = subprocess.run([sys.executable, str(ROOT / "launch" / "bench_corpus.py")], env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and "already built" in again.stdout
    marker = json.loads((root / "corpus.json").read_text())
    assert marker["inputs"]["fortunes"]["version"] and "shards/manifest.json" in marker["outputs"]
