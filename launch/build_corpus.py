"""Rebuild the embedded default corpus under data/default/ (a maintainer's tool, not needed to run).

The committed corpus was built with this script from material installed from Debian's packages and
the Python standard library:

    apt-get install -y --no-install-recommends r-cran-janeaustenr
    Rscript -e 'library(janeaustenr); write.csv(austen_books(),"austen.csv",row.names=FALSE)'
    python launch/build_corpus.py --austen austen.csv

Four domains that differ in how learnable they are:
  prose  Jane Austen's novels (public domain), paragraphs grouped into ~1 KB documents
  code   Python standard library sources (PSF licence), ~1 KB chunks cut at blank lines
  math   generated integer arithmetic with worked answers (fully learnable, periodic)
  noise  random printable characters (unlearnable: the loss floor is the alphabet's entropy)
It also trains the byte-level BPE tokenizer (HF `tokenizers`) on the training splits.
"""
import argparse
import csv
import json
import random
import sysconfig
from pathlib import Path

DOC_CHARS = 1000


def group(paragraphs, limit=DOC_CHARS):
    doc = []
    for p in paragraphs:
        doc.append(p)
        if sum(len(x) for x in doc) >= limit:
            yield "\n\n".join(doc)
            doc = []
    if doc:
        yield "\n\n".join(doc)


def prose_docs(austen_csv):
    with open(austen_csv, newline="") as f:
        lines = [row["text"] for row in csv.DictReader(f)]
    paragraphs, cur = [], []
    for line in lines:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            paragraphs.append(" ".join(cur))
            cur = []
    return list(group(p for p in paragraphs if len(p) > 40))


def code_docs():
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    docs = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        docs.extend(group(block for block in text.split("\n\n") if block.strip()))
    return docs


def math_docs(rng, n):
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(24):
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            op = rng.choice("+-*")
            if op == "*":
                b = rng.randint(0, 99)
            lines.append(f"{a} {op} {b} = {eval(f'{a}{op}{b}')}")
        docs.append("\n".join(lines))
    return docs


def noise_docs(rng, n):
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?-'\"()"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(400, 1200))) for _ in range(n)]


def write_split(out, name, docs, rng, train_chars, val_chars):
    docs = list(docs)
    rng.shuffle(docs)
    (out / name).mkdir(parents=True, exist_ok=True)
    used = 0
    for split, budget in (("val", val_chars), ("train", train_chars)):
        taken = 0
        with open(out / name / f"{split}.jsonl", "w") as f:
            while used < len(docs) and taken < budget:
                f.write(json.dumps({"text": docs[used], "source": f"{name}:{used}"}) + "\n")
                taken += len(docs[used])
                used += 1


def train_tokenizer(out, vocab_size):
    """The same byte-level BPE as the benchmark corpus's (dataprep.corpora.bench.pipeline.train_tokenizer),
    trained on every domain's train split."""
    from dataprep.corpora.bench.pipeline import train_tokenizer as train_bpe

    train_bpe(sorted(out.glob("*/train.jsonl")), out / "tokenizer.json", vocab_size)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--austen", required=True, help="austen_books() exported as CSV")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "data" / "default"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=2048)
    args = ap.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    write_split(out, "prose", prose_docs(args.austen), rng, 700_000, 50_000)
    write_split(out, "code", code_docs(), rng, 600_000, 50_000)
    write_split(out, "math", math_docs(rng, 500), rng, 300_000, 30_000)
    write_split(out, "noise", noise_docs(rng, 400), rng, 250_000, 30_000)
    train_tokenizer(out, args.vocab_size)


if __name__ == "__main__":
    main()
