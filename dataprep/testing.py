"""Synthetic corpora with planted problems, for the tests and the benchmark (seeded, no downloads)."""
from __future__ import annotations

import json
import os
import random

_SYLLABLES = ["ka", "lo", "mi", "ten", "ra", "su", "vo", "ne", "di", "po", "sha", "qui", "bel", "tor", "an",
              "es", "ul", "mar", "fin", "gro", "ly", "dex", "ro", "ta", "ven"]


def vocabulary(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return sorted(words)


def make_doc(rng: random.Random, vocab: list[str], n_words: int = 80) -> str:
    """A prose-like paragraph of distinct random sentences (no internal repetition)."""
    words = [rng.choice(vocab) for _ in range(n_words)]
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 14)
        sent = " ".join(words[i:i + k])
        out.append(sent[:1].upper() + sent[1:] + ".")
        i += k
    return " ".join(out)


def near_copy(rng: random.Random, text: str, vocab: list[str], changes: int = 1) -> str:
    words = text.split()
    for _ in range(changes):
        words[rng.randrange(len(words))] = rng.choice(vocab)
    return " ".join(words)


def planted_jsonl(path: str, n_unique: int = 40, seed: int = 0, n_words: int = 100) -> dict:
    """Write a JSONL file with ``n_unique`` distinct documents plus planted problems; returns the counts.

    Planted: 3 exact duplicates, 2 near duplicates (one word changed in a 100-word document), and one each
    of bad JSON, missing ``text``, non-string ``text``, empty ``text`` and a JSON array. Blank lines are
    skipped without counting.
    """
    rng = random.Random(seed)
    vocab = vocabulary(seed=seed)
    docs = [make_doc(rng, vocab, n_words) for _ in range(n_unique)]
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    plant = [
        json.dumps({"text": docs[0]}),                               # exact dup
        json.dumps({"text": docs[1]}),                               # exact dup
        json.dumps({"text": "  " + docs[2] + "\n\n\n\n"}),           # exact dup after normalisation
        json.dumps({"text": near_copy(rng, docs[3], vocab)}),         # near dup
        json.dumps({"text": near_copy(rng, docs[4], vocab)}),         # near dup
        '{"text": "broken json',                                        # bad_json
        json.dumps({"title": "no text here"}),                        # missing_text
        json.dumps({"text": 42}),                                     # non_string_text
        json.dumps({"text": "   \n "}),                               # empty_text
        json.dumps(["not", "an", "object"]),                          # not_an_object
    ]
    for j, p in enumerate(plant):
        lines.insert(5 + 4 * j, p)
    lines.insert(3, "")  # a blank line
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"unique": n_unique, "exact_duplicate": 3, "near_duplicate": 2, "bad_json": 1, "missing_text": 1,
            "non_string_text": 1, "empty_text": 1, "not_an_object": 1, "records": n_unique + len(plant)}


def bench_jsonl(path: str, n_docs: int, seed: int = 0, dup_every: int = 20, n_words: int = 200) -> None:
    """A larger corpus for the benchmark: random prose with an exact copy every ``dup_every`` documents
    and a near copy every ``dup_every`` documents (offset by half)."""
    rng = random.Random(seed)
    vocab = vocabulary(seed=seed)
    docs: list[str] = []
    with open(path, "w") as f:
        for i in range(n_docs):
            if docs and i % dup_every == 0:
                text = rng.choice(docs)
            elif docs and i % dup_every == dup_every // 2:
                text = near_copy(rng, rng.choice(docs), vocab)
            else:
                text = make_doc(rng, vocab, n_words)
                if len(docs) < 5000:
                    docs.append(text)
            f.write(json.dumps({"text": text}) + "\n")


def shingle_set(text: str, n: int = 5) -> set:
    """Word n-grams of the lowercased text (MinHashDedup's shingles, as strings)."""
    words = text.lower().split()
    if len(words) <= n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def shingle_jaccard(a: str, b: str, n: int = 5) -> float:
    x, y = shingle_set(a, n), shingle_set(b, n)
    return len(x & y) / len(x | y)


def planted_pairs(n_pairs: int, low: float = 0.6, high: float = 0.95, n_words: int = 200, seed: int = 0,
                  ngram: int = 5) -> list[tuple[str, str, float]]:
    """(original, near copy, exact word n-gram Jaccard) with Jaccard spread over [low, high]: each copy
    has words replaced, one at a time at random positions, until its Jaccard with the original falls to
    a target drawn uniformly from [low, high]. Lowercase words without punctuation, so every tokenizer
    (dataprep's, datatrove's) sees the same shingles; originals are independent random texts."""
    rng = random.Random(seed)
    vocab = vocabulary(seed=seed)
    out = []
    for _ in range(n_pairs):
        words = [rng.choice(vocab) for _ in range(n_words)]
        target, copy = rng.uniform(low, high), list(words)
        a = " ".join(words)
        j = 1.0
        while j > target:
            copy[rng.randrange(n_words)] = rng.choice(vocab)
            j = shingle_jaccard(a, " ".join(copy), ngram)
        out.append((a, " ".join(copy), j))
    return out
