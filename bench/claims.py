"""The claims audit: every number in the result and benchmark tables of the READMEs and the docs is found
in a committed result file.

    .venv/bin/python bench/claims.py            # lists the orphans (numbers found in no source); exit 1 if any
    .venv/bin/python bench/claims.py --list     # every number of every audited table and where it was found

Which tables, and their sources, are said in the pages themselves by HTML comments (invisible on the site):

    <!-- claims: source=bench/results/packing.json -->        the tables below come from these files
    <!-- claims: historical -->                               not audited: the figures below have no committed
                                                              source; the section (from its heading) must
                                                              say so in words ("no committed source")
    <!-- claims: not-a-result REASON -->                      the tables below describe settings, not results

A marker holds from where it stands to the next marker, or to the next heading of the same or a higher
level than the heading it stands under. Generated results pages (`docs/results/*/report.md`,
`comparison.md`) carry no markers: their sources are the `report.csv` / `comparison.csv` beside them
(`DEFAULT_SOURCES`). A table in an audited page with no marker and no default source is an orphan table.

Matching: a number in a page matches a number in a source when they are equal after the page's rounding
(1.17× matches 1.1693; 2,045 matches 2045.3; 7e-08 matches 6.8e-08). A percentage also matches its
fraction (24.77% matches 0.2477), and `32k` matches 32,000 or 32,768. Numbers inside code spans
(`--steps 10`), dates, times of day and commit hashes are not figures and are skipped. Sources are JSON
(every number, and the numbers written inside its strings) and CSV files (every cell).
"""
from __future__ import annotations

import argparse
import bisect
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the pages whose tables are audited (globs, relative to the repository)
PAGES = ("README.md", "bench/README.md", "dataprep/README.md", "docs/benchmarks.md", "docs/results/*.md",
         "docs/results/*/*.md", "docs/data/*.md")

# generated pages: their tables come from the files beside them
DEFAULT_SOURCES = {"docs/results/*/report.md": ("report.csv",), "docs/results/*/comparison.md": ("comparison.csv",)}

SOURCE_SUFFIXES = (".json", ".csv")
MARKER = re.compile(r"<!--\s*claims:\s*(source=(?P<src>[^>]*?)|(?P<hist>historical)"
                    r"|(?P<nar>not-a-result)\b(?P<why>[^>]*?))\s*-->")
HEADING = re.compile(r"^(#{1,6})\s")
HISTORICAL_LABEL = "no committed source"

# a figure in a page: an optional sign, digits (with thousands commas), decimals, an exponent, a unit
DOC_NUMBER = re.compile(r"(?<![\w.])(?P<sign>[-−])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
                        r"(?P<exp>e[-+]?\d+)?(?P<unit>k|%|×|x)?(?![\w.]\d|[A-Za-wyz_])")
SRC_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
NOT_FIGURES = re.compile(r"`[^`]*`"                       # code spans: settings, commands
                         r"|\b20\d\d-\d\d-\d\d(?:T[\d:+]+)?\b"   # dates
                         r"|\b\d{1,2}:\d\d(?::\d\d)?\b"          # times of day
                         r"|\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*\d)[0-9a-f]{7,40}\b"  # commit hashes
                         r"|\]\([^)]*\)")                  # link targets


@dataclass
class Figure:
    text: str            # as written in the page
    value: float
    tol: float           # half a unit of the last written digit
    percent: bool
    kilo: bool


@dataclass
class Table:
    page: str
    line: int            # 1-based line of the table's first row
    rows: list
    mode: str            # "source", "historical", "not-a-result" or "unsourced"
    sources: tuple = ()
    why: str = ""
    section: str = ""    # the text the marker governs (for the historical label check)
    prose: list = field(default_factory=list)    # (line, text) of the marker's prose lines


@dataclass
class Report:
    tables: list = field(default_factory=list)
    checked: list = field(default_factory=list)      # (page, line, figure text, source that holds it)
    orphans: list = field(default_factory=list)      # (page, line, figure text, cell)
    problems: list = field(default_factory=list)     # markers that lie, sources missing, orphan tables


def parse_figure(m: re.Match) -> Figure:
    digits = m["int"].replace(",", "")
    frac = m["frac"] or ""
    exp = int(m["exp"][1:]) if m["exp"] else 0
    value = float(digits + frac) * 10.0 ** exp
    if m["sign"]:
        value = -value
    tol = 0.5 * 10.0 ** (exp - (len(frac) - 1 if frac else 0))
    return Figure(m.group(0), value, tol, m["unit"] == "%", m["unit"] == "k")


def figures_in(text: str) -> list:
    """The figures written in a piece of a page (code spans, dates, times, hashes and link targets left out)."""
    text = NOT_FIGURES.sub(" ", text).replace("**", " ")
    return [parse_figure(m) for m in DOC_NUMBER.finditer(text)]


def _numbers_in_string(s: str, out: list) -> None:
    for m in SRC_NUMBER.finditer(s):
        try:
            out.append(float(m.group(0).replace(",", "")))
        except ValueError:
            pass


def source_numbers(path: Path) -> list:
    """Every number a result file holds, sorted."""
    out: list = []
    if path.suffix == ".json":
        def walk(x):
            if isinstance(x, bool):
                return
            if isinstance(x, (int, float)):
                if math.isfinite(x):
                    out.append(float(x))
            elif isinstance(x, str):
                _numbers_in_string(x, out)
            elif isinstance(x, dict):
                for k, v in x.items():
                    _numbers_in_string(str(k), out)
                    walk(v)
            elif isinstance(x, list):
                for v in x:
                    walk(v)
        walk(json.loads(path.read_text()))
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            for row in csv.reader(f):
                for cell in row:
                    try:
                        v = float(cell)
                        if math.isfinite(v):
                            out.append(v)
                    except ValueError:
                        _numbers_in_string(cell, out)
    else:
        raise ValueError(f"{path}: a source is a JSON or CSV file")
    return sorted(out)


def _near(values: list, target: float, tol: float) -> bool:
    tol = tol * (1 + 1e-9) + 1e-12
    i = bisect.bisect_left(values, target - tol)
    return i < len(values) and values[i] <= target + tol


def matches(fig: Figure, values: list) -> bool:
    """Whether `fig` is one of the sorted `values` after the page's rounding."""
    if _near(values, fig.value, fig.tol):
        return True
    if fig.percent and _near(values, fig.value / 100, fig.tol / 100):
        return True
    if fig.kilo:
        return any(_near(values, fig.value * base, fig.tol * base) for base in (1000, 1024))
    return False


def split_cells(line: str) -> list:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip() for c in cells]


def parse_page(rel: str, default_sources: tuple = ()) -> list:
    """The tables of a page with the marker that governs each."""
    lines = (ROOT / rel).read_text().splitlines()
    tables, marker, level_now = [], None, 0
    in_code, i, since_heading = False, 0, []
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_code = not in_code
            i += 1
            continue
        if in_code:
            i += 1
            continue
        since_heading.append(line)
        h = HEADING.match(line)
        if h:
            level = len(h.group(1))
            if marker is not None and level <= marker["level"]:
                marker = None
            level_now, since_heading = level, [line]
            if marker is not None:
                marker["text"].append(line)
            i += 1
            continue
        m = MARKER.search(line)
        if m:
            if m["src"] is not None:
                marker = {"mode": "source", "sources": tuple(m["src"].split()), "why": ""}
            elif m["hist"]:
                marker = {"mode": "historical", "sources": (), "why": ""}
            else:
                marker = {"mode": "not-a-result", "sources": (), "why": m["why"].strip()}
            marker.update(level=level_now, text=list(since_heading), line=i + 1, prose=[])
            i += 1
            continue
        if marker is not None:
            marker["text"].append(line)
            if not line.startswith("|"):
                marker["prose"].append((i + 1, line))
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|\s*$", lines[i + 1]):
            start, rows = i, [split_cells(line)]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(split_cells(lines[i]))
                if marker is not None:
                    marker["text"].append(lines[i])
                i += 1
            if marker is not None:
                tables.append(Table(rel, start + 1, rows, marker["mode"], marker["sources"], marker["why"],
                                    section="\n".join(marker["text"]), prose=marker["prose"]))
                marker["tables"] = marker.get("tables", 0) + 1
            elif default_sources:
                tables.append(Table(rel, start + 1, rows, "source", default_sources))
            else:
                tables.append(Table(rel, start + 1, rows, "unsourced"))
            continue
        i += 1
    return tables


def pages() -> list:
    seen = []
    for pattern in PAGES:
        for p in sorted(ROOT.glob(pattern)):
            rel = p.relative_to(ROOT).as_posix()
            if rel not in seen:
                seen.append(rel)
    return seen


def _defaults(rel: str) -> tuple:
    for pattern, names in DEFAULT_SOURCES.items():
        if Path(rel).match(pattern):
            return tuple((Path(rel).parent / n).as_posix() for n in names)
    return ()


def audit(page_list=None) -> Report:
    report, cache = Report(), {}
    for rel in page_list or pages():
        for t in parse_page(rel, _defaults(rel)):
            report.tables.append(t)
            if t.mode == "not-a-result":
                if not t.why:
                    report.problems.append(f"{rel}:{t.line}: a not-a-result marker says no reason")
                continue
            if t.mode == "historical":
                if HISTORICAL_LABEL not in t.section.lower():
                    report.problems.append(f"{rel}:{t.line}: a historical section that does not say "
                                           f"'{HISTORICAL_LABEL}' where readers see it")
                continue
            figures = [(f, cell) for row in t.rows for cell in row for f in figures_in(cell)]
            if t.mode == "unsourced":
                if figures:
                    report.problems.append(f"{rel}:{t.line}: a table of figures with no source, historical "
                                           f"or not-a-result marker")
                    report.orphans += [(rel, t.line, f.text, cell) for f, cell in figures]
                continue
            values = []
            for s in t.sources:
                if s not in cache:
                    path = ROOT / s
                    if not path.is_file() or path.suffix not in SOURCE_SUFFIXES:
                        report.problems.append(f"{rel}:{t.line}: source {s} is not a JSON or CSV file here")
                        cache[s] = []
                    else:
                        cache[s] = source_numbers(path)
                values.append((s, cache[s]))
            for f, cell in figures:
                where = next((s for s, v in values if matches(f, v)), None)
                if where is None:
                    report.orphans.append((rel, t.line, f.text, cell))
                else:
                    report.checked.append((rel, t.line, f.text, where))
    return report


PROSE_UNITS = re.compile(r"^\s*(×|x\b|ms\b|%)")


def prose_report(report: Report) -> list:
    """Figures with a unit (×, x, ms, %) in the prose of sourced sections that their sources do not hold:
    printed by --prose for a reader to judge (prose also states targets and derived figures), never a failure."""
    out, seen, cache = [], set(), {}
    for t in report.tables:
        if t.mode != "source":
            continue
        values = []
        for s in t.sources:
            if s not in cache:
                cache[s] = source_numbers(ROOT / s) if (ROOT / s).is_file() else []
            values += cache[s]
        values.sort()
        for line_no, line in t.prose:
            if (t.page, line_no) in seen:
                continue
            seen.add((t.page, line_no))
            clean = NOT_FIGURES.sub(" ", line)
            for m in DOC_NUMBER.finditer(clean):
                unit = m["unit"] in ("×", "x", "%") or PROSE_UNITS.match(clean[m.end():])
                if unit and not matches(parse_figure(m), values):
                    out.append(f"{t.page}:{line_no}: {m.group(0)}  ({line.strip()[:90]})")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--list", action="store_true", help="every audited figure and the source that holds it")
    p.add_argument("--prose", action="store_true",
                   help="also list figures with a unit in sourced sections' prose that the sources do not hold")
    p.add_argument("pages", nargs="*", help="audit these pages only (default: every page in PAGES)")
    a = p.parse_args(argv)
    r = audit(a.pages or None)
    if a.list:
        for rel, line, text, src in r.checked:
            print(f"{rel}:{line}: {text}  <- {src}")
    for rel, line, text, cell in r.orphans:
        print(f"ORPHAN {rel}:{line}: {text}   (cell: {cell[:80]})")
    for problem in r.problems:
        print(f"PROBLEM {problem}")
    if a.prose:
        for line in prose_report(r):
            print(f"PROSE (not found; a target or a derived figure?) {line}")
    modes = {}
    for t in r.tables:
        modes[t.mode] = modes.get(t.mode, 0) + 1
    print(f"{len(r.tables)} tables ({', '.join(f'{v} {k}' for k, v in sorted(modes.items()))}); "
          f"{len(r.checked)} figures found in their sources, {len(r.orphans)} orphaned, {len(r.problems)} problems")
    return 1 if r.orphans or r.problems else 0


if __name__ == "__main__":
    sys.exit(main())
