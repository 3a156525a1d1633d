"""One generator per source, yielding (doc_id, text) documents (datatrove-style readers).

Each takes the folder (or file) its package put on disk, so tests can hand it a tiny fixture."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Iterator

Doc = tuple[str, str]


def group(blocks: Iterable[str], limit: int, sep: str = "\n\n") -> Iterator[str]:
    """Consecutive blocks joined into documents of at least `limit` characters (the last may be shorter)."""
    doc: list[str] = []
    size = 0
    for b in blocks:
        doc.append(b)
        size += len(b)
        if size >= limit:
            yield sep.join(doc)
            doc, size = [], 0
    if doc:
        yield sep.join(doc)


def blocks(text: str) -> list[str]:
    """Blank-line separated blocks, trailing whitespace stripped, empty ones dropped."""
    return [b.strip("\n").rstrip() for b in re.split(r"\n[ \t]*\n", text) if b.strip()]


# --- prose: Jane Austen's six novels (R package janeaustenr's lazy-load database) ------------------

def read_rdata_lazyload(folder: Path) -> dict:
    """R's lazy-load database (`Rdata.rdx` gzip'd index, `Rdata.rdb` zlib'd entries with a 4-byte
    big-endian length) as {name: python object}, parsed by the pure-Python `rdata` package."""
    import struct
    import warnings
    import zlib

    import rdata

    def parse(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # "Unknown file type: assumed RDS": it is one
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = parse(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    rdb = (folder / "Rdata.rdb").read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        entry = rdb[int(off):int(off) + int(length)]
        size = struct.unpack(">I", entry[:4])[0]
        raw = zlib.decompress(entry[4:])
        assert len(raw) == size, f"{name}: corrupt lazy-load entry"
        out[str(name)] = parse(raw)
    return out


def paragraphs(lines: Iterable[str]) -> Iterator[str]:
    cur: list[str] = []
    for line in list(lines) + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            yield " ".join(cur)
            cur = []


def austen(novels: dict, doc_chars: int = 2000) -> Iterator[Doc]:
    """{novel: [lines]} -> paragraphs (over 40 characters) grouped into ~2 KB documents."""
    for novel in sorted(novels):
        paras = (p for p in paragraphs(str(x) for x in novels[novel]) if len(p) > 40)
        for i, doc in enumerate(group(paras, doc_chars)):
            yield f"austen:{novel}:{i}", doc


# --- quotes: fortune cookie files --------------------------------------------------------------------

def fortunes(folder: Path) -> Iterator[Doc]:
    """Every category file (not `.dat`/`.u8`) split into records at lines holding only `%`."""
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix not in (".dat", ".u8")):
        text = path.read_text(encoding="utf-8", errors="replace")
        records = re.split(r"^%[ \t]*$", text, flags=re.M)
        for i, rec in enumerate(records):
            rec = rec.strip("\n").rstrip()
            if rec.strip():
                yield f"fortunes:{path.relative_to(folder)}:{i}", rec


# --- code: the Python standard library ---------------------------------------------------------------

def python_files(stdlib: Path, tests: bool) -> list[Path]:
    """Sorted *.py of the standard library without site-packages; test modules (under a `test`/`tests`
    folder or named test_*.py) only when `tests`, else only the others."""
    out = []
    for p in sorted(Path(stdlib).rglob("*.py")):
        rel = p.relative_to(stdlib).parts
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        is_test = any(part in ("test", "tests", "idle_test") for part in rel[:-1]) or rel[-1].startswith("test_")
        if is_test == tests:
            out.append(p)
    return out


def code(stdlib: Path, tests: bool = False, doc_chars: int = 4000) -> Iterator[Doc]:
    """Source files cut at blank lines into ~4 KB documents."""
    for path in python_files(stdlib, tests):
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, doc in enumerate(group(blocks(text), doc_chars)):
            yield f"stdlib:{path.relative_to(stdlib)}:{i}", doc


# --- math and dialogue: CHAMP --------------------------------------------------------------------------

def champ_problem(p: dict) -> str:
    sol = p.get("solution") or {}
    steps = [s.get("_text") or s.get("_raw_text") or "" for s in sol.get("steps", [])] if isinstance(sol, dict) else []
    text = f"Problem ({p.get('category', 'math')}): {p['_text']}"
    if steps:
        text += "\n\nSolution:\n" + "\n".join(f"{i + 1}. {s}" for i, s in enumerate(steps) if s)
    answer = p.get("_answer")
    return text + (f"\n\nAnswer: {answer}" if answer else "")


def champ_math(data: dict, problems: Iterable[str]) -> Iterator[Doc]:
    """The named problems with their step-by-step solutions, then every concept and hint."""
    for pid in problems:
        yield f"champ:problem:{pid}", champ_problem(data["problems"][pid])
    for cid, c in sorted(data.get("concepts", {}).items()):
        name = f" ({c['name']})" if c.get("name") else ""
        yield f"champ:concept:{cid}", f"Concept{name}, {c.get('category', 'math')}: {c['_text']}"
    for hid, h in sorted(data.get("hints", {}).items()):
        yield f"champ:hint:{hid}", f"Hint: {h['_text']}"


def champ_dialogue(data: dict, problems: Iterable[str]) -> Iterator[Doc]:
    """Each conversation about the named problems as `Role: text` turns; exact duplicates (the same
    turns under another setting) once."""
    seen = set()
    for pid in problems:
        for setting, conv in sorted(data["problems"][pid].get("conversations", {}).items()):
            turns = [f"{m['role'].split('.')[0]}: {m['text'].strip()}" for m in conv.get("messages", [])
                     if m.get("text")]
            text = "\n\n".join(turns)
            key = hashlib.sha1(text.encode()).digest()
            if text and key not in seen:
                seen.add(key)
                yield f"champ:dialogue:{pid}:{setting}", text


def load_champ(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# --- technical docs: the Python documentation's reST sources -------------------------------------------

def rst_docs(sources: Path, include: tuple = (), exclude: tuple = (), doc_chars: int = 4000) -> Iterator[Doc]:
    """`**/*.rst.txt` under `sources` (top folders in `include` only, if given; not those in `exclude`),
    cut at blank lines into ~4 KB documents."""
    for path in sorted(Path(sources).rglob("*.rst.txt")):
        top = path.relative_to(sources).parts[0]
        if (include and top not in include) or top in exclude:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for i, doc in enumerate(group(blocks(text), doc_chars)):
            yield f"pydoc:{path.relative_to(sources)}:{i}", doc


# --- glossary: FOLDOC ------------------------------------------------------------------------------------

def foldoc(path: Path) -> Iterator[Doc]:
    """dictd's `foldoc.dict.dz` (gzip-readable): an entry starts at an unindented line (its headword) and
    holds the indented lines after it; the `00-database-*` header entries are skipped."""
    opener = gzip.open if str(path).endswith((".dz", ".gz")) else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        head, body = None, []
        for line in list(f) + ["\x00end"]:
            line = line.rstrip("\n")
            if line and not line[0].isspace():
                if head is not None and not head.startswith("00-database") and any(b.strip() for b in body):
                    yield f"foldoc:{head}", head + "\n\n" + "\n\n".join(paragraphs(body))
                head, body = line, []
            elif head is not None:
                body.append(line)
