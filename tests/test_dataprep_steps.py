"""dataprep readers and operators in isolation."""
from __future__ import annotations

import random

import pytest

from dataprep.document import Document
from dataprep.readers import (
    InputError,
    Source,
    detect_format,
    expand_entry,
    read_source,
)
from dataprep.steps.exact_dedup import ExactDedup
from dataprep.steps.length import LengthFilter
from dataprep.steps.minhash_dedup import MinHashDedup
from dataprep.steps.normalize import Normalize
from dataprep.steps.quality import QualityFilter
from dataprep.steps.repetition import RepetitionFilter
from dataprep.testing import make_doc, near_copy, vocabulary


def _docs(texts, domain="d"):
    return [Document(t, f"{domain}:{i}", {"domain": domain}) for i, t in enumerate(texts)]


def test_text_reader_paragraphs_and_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first para\nstill first\n\n\n  \nsecond\n\nthird\n")
    recs = list(read_source(Source(str(p), "text")))
    assert [(r.line, r.text) for r in recs] == [(1, "first para\nstill first\n"), (6, "second\n"), (8, "third\n")]
    whole = list(read_source(Source(str(p), "text"), text_split="file"))
    assert len(whole) == 1 and whole[0].line == 1


def test_hf_dataset_reader(tmp_path):
    import datasets
    datasets.Dataset.from_dict({"text": ["a b c", "", "d e f"], "x": [1, 2, 3]}).save_to_disk(str(tmp_path / "hf"))
    srcs = expand_entry(str(tmp_path / "hf"), "k")
    assert srcs == [Source(str(tmp_path / "hf"), "hf")]
    recs = list(read_source(srcs[0]))
    assert [(r.line, r.text, r.reason) for r in recs] == [(0, "a b c", None), (1, None, "empty_text"), (2, "d e f", None)]
    with pytest.raises(InputError, match="no column 'body'"):
        list(read_source(srcs[0], text_key="body"))


def test_folder_glob_and_formats(tmp_path):
    (tmp_path / "f" / "sub").mkdir(parents=True)
    for name in ("b.jsonl", "a.txt", "sub/c.parquet", ".hidden"):
        (tmp_path / "f" / name).write_text("")
    got = [(s.path.split("/f/")[1], s.fmt) for s in expand_entry(str(tmp_path / "f"), "k")]
    assert got == [("a.txt", "text"), ("b.jsonl", "jsonl"), ("sub/c.parquet", "parquet")]
    assert detect_format("x.jsonl.zst") == "jsonl" and detect_format("x.json.gz") == "jsonl"
    with pytest.raises(InputError, match="k: no input matches"):
        expand_entry(str(tmp_path / "none*.jsonl"), "k")


def test_jsonl_malformed_reasons(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"text": "ok"}\n\n{bad\n{"t": 1}\n{"text": null}\n{"text": ["a"]}\n[1]\n"s"\n\xff\xfe\n')
    got = [(r.line, r.reason) for r in read_source(Source(str(p), "jsonl"))]
    assert got == [(1, None), (3, "bad_json"), (4, "missing_text"), (5, "missing_text"), (6, "non_string_text"),
                   (7, "not_an_object"), (8, "not_an_object"), (9, "bad_utf8")]


def test_normalize():
    n = Normalize()
    assert n.normalize("e\u0301t\u00e9\u200b \r\nx\u00a0y  \n\n\n\n\nz\t \n") == "\u00e9t\u00e9\nx y\n\n\nz"
    assert n.normalize("def f():\n    return  1\n") == "def f():\n    return  1"  # indentation and alignment kept


def test_quality_and_length_reasons():
    q = QualityFilter()
    prose = "The cat sat on the mat and looked out of the window at the birds in the garden today."
    assert q.check(Document(prose, "a")) is None
    assert q.check(Document("# " * 20 + prose, "b")) == "symbol_ratio"
    assert q.check(Document("1234567 89 " * 10 + "x", "c")) == "digit_ratio"
    assert q.check(Document("Qx7!zP$wLk9#vB@mN2&rT^yH*jK " * 5, "d")) in ("non_alnum_ratio", "symbol_ratio")
    assert q.check(Document("xkcdqrtzplmnbvc " * 10, "e")) in ("mean_word_length", "vowelless_words")
    assert q.check(Document("\n".join(["- item one here now"] * 10), "f")) == "bullet_lines"
    lf = LengthFilter(min_chars=10, min_words=3, max_words=5)
    assert lf.check(Document("short", "a")) == "too_short_chars"
    assert lf.check(Document("two wordsss", "b")) == "too_few_words"
    assert lf.check(Document("a b c d e f", "c")) == "too_many_words"


def test_repetition_filter():
    rng = random.Random(0)
    vocab = vocabulary()
    r = RepetitionFilter()
    good = make_doc(rng, vocab, 120)
    assert r.check(Document(good, "a")) is None
    assert r.check(Document("\n".join(["same line again"] * 5 + ["other"]), "b")) == "dup_lines"
    looped = " ".join([make_doc(rng, vocab, 30)] * 4)
    assert r.check(Document(looped, "c")).startswith(("top_", "dup_"))


def test_steps_compose_as_generators_with_stats():
    rng = random.Random(1)
    vocab = vocabulary()
    base = [make_doc(rng, vocab, 100) for _ in range(20)]
    texts = base + [base[0], near_copy(rng, base[1], vocab), "tiny"]
    kept, dropped = [], []
    steps = [Normalize(), LengthFilter(min_words=5), ExactDedup(), MinHashDedup(threshold=0.8)]
    for s in steps:
        s.on_drop = lambda d, why: dropped.append((d.id, why))
    stream = _docs(texts)
    for s in steps:
        stream = s.run(stream)
    kept = [d.id for d in stream]
    assert kept == [f"d:{i}" for i in range(20)]
    assert dropped == [("d:22", "too_few_words"), ("d:20", "exact_duplicate"), ("d:21", "near_duplicate")] or \
        sorted(dropped) == sorted([("d:22", "too_few_words"), ("d:20", "exact_duplicate"), ("d:21", "near_duplicate")])
    assert steps[2].stats.as_dict() == {"docs_in": 22, "docs_out": 21, "dropped": {"exact_duplicate": 1}}
    assert steps[3].stats.as_dict() == {"docs_in": 21, "docs_out": 20, "dropped": {"near_duplicate": 1}}


def test_minhash_keeps_what_brute_force_jaccard_keeps():
    """Our step (signature + LSH + exact Jaccard check) against the all-pairs reference: a document is
    dropped iff an earlier kept document's word 5-gram set is at least 0.8 Jaccard-similar to it. Near
    copies with 1-4 changed words sit on both sides of the threshold."""
    from dataprep.testing import shingle_jaccard

    rng = random.Random(2)
    vocab = vocabulary()
    base = [make_doc(rng, vocab, 100) for _ in range(60)]
    texts = base + [near_copy(rng, rng.choice(base), vocab, changes=1 + i % 4) for i in range(24)]
    step = MinHashDedup(threshold=0.8, num_perm=128)
    ours = [d.id for d in step.run(_docs(texts))]
    kept, ref = [], []
    for i, t in enumerate(texts):
        if not any(shingle_jaccard(t, k) >= 0.8 for k in kept):
            kept.append(t)
            ref.append(f"d:{i}")
    assert ours == ref
    assert ours[:60] == [f"d:{i}" for i in range(60)] and 62 < len(ours) < 80      # copies kept and dropped


def test_domain_scope_and_domain_restriction():
    t = "one two three four five six seven"
    docs = _docs([t], "a") + _docs([t], "b")
    assert len(list(ExactDedup(scope="global").run([Document(d.text, d.id + d.metadata["domain"], dict(d.metadata)) for d in docs]))) == 1
    assert len(list(ExactDedup(scope="domain").run(docs))) == 2
    assert len(list(LengthFilter(min_words=100, domains=["b"]).run(_docs([t], "a") + _docs([t], "b")))) == 1


def test_prose_heuristics_apply_to_text_domains_only(tmp_path):
    """The default chain scopes its quality and repetition filters with `kinds: [text]`: clean code
    in a `kind: code` domain passes, the same code declared as text does not."""
    import sysconfig
    from pathlib import Path

    from dataprep.plan import build_plan
    code = [Path(sysconfig.get_paths()["stdlib"], n).read_text()[:3000] for n in ("json/encoder.py", "shlex.py",
                                                                                    "bisect.py", "heapq.py")]
    code = [c + "\n" + "x = {'a': [1, 2], 'b': (3, 4)}  # " + "#" * 40 + "\n" for c in code]
    docs = [Document(t, f"c:{i}", {"domain": "c", "kind": "code"}) for i, t in enumerate(code)]
    as_text = [Document(t, f"t:{i}", {"domain": "t"}) for i, t in enumerate(code)]
    steps = lambda: (QualityFilter(max_symbol_word_ratio=0.01, max_non_alnum_ratio=0.2, kinds=["text"]),  # noqa: E731
                     RepetitionFilter(kinds=["text"]))
    for step in steps():
        assert len(list(step.run(docs))) == len(docs)        # code passes untouched
    kept = as_text
    for step in steps():
        kept = list(step.run(kept))
    assert len(kept) < len(as_text)                          # the same documents as text are filtered
    assert QualityFilter(kinds=["text"]).params()["kinds"] == ["text"]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    plan = build_plan({"domains": {"py": {"train": str(tmp_path / "a.jsonl"), "kind": "code"},
                                   "web": {"train": str(tmp_path / "a.jsonl")}}})
    assert [(t.domain, t.content) for t in plan] == [("py", "code"), ("web", "text")]
    with pytest.raises(InputError, match=r"data\.domains\.py\.kind: 'python' is not one of text, code, math"):
        build_plan({"domains": {"py": {"train": str(tmp_path / "a.jsonl"), "kind": "python"}}})
