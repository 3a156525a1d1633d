"""The claims audit (bench/claims.py): every figure in the result and benchmark tables of the READMEs and the
docs is found in a committed result file, and the markers that exempt a table say what they claim."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import claims  # noqa: E402


def fig(text: str) -> claims.Figure:
    found = claims.figures_in(text)
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("doc, source", [
    ("1.17×", 1.1693), ("2,045", 2045.3), ("24.77%", 0.2477), ("24.77%", 24.77), ("0.874", 0.8741),
    ("7e-08", 6.8e-08), ("32k", 32000), ("128k", 131072), ("1e+09", 1e9), ("2.3x", 2.30), ("-0.16", -0.158),
    ("928.0", 927.96), ("11,904", 11904.4),
])
def test_a_figure_matches_its_source_after_the_pages_rounding(doc, source):
    assert claims.matches(fig(doc), [source])


@pytest.mark.parametrize("doc, source", [
    ("1.17×", 1.1751), ("2,045", 2046.0), ("24.77%", 0.2478), ("0.874", 0.8734), ("7e-08", 8e-08),
    ("32k", 34000), ("-0.16", 0.16), ("1.0", 1.06),
])
def test_a_figure_does_not_match_a_different_number(doc, source):
    assert not claims.matches(fig(doc), [source])


def test_what_is_not_a_figure_is_skipped():
    text = "2026-11-24, commit dfbebe8 at 13:13, `--steps 40`, [page](results/x-2.md), SmolLM2 and 3.5"
    assert [f.text for f in claims.figures_in(text)] == ["3.5"]
    assert [f.value for f in claims.figures_in("**4.800** ± 0.031 (2/3 seeds)")] == [4.8, 0.031, 2, 3]


def test_sources_hold_the_numbers_inside_strings(tmp_path):
    (tmp_path / "r.json").write_text('{"rows": [["step", "2,045 vs 1,745 ms/step (fastest 1.70×)"]], "n": 3,'
                                     ' "ok": true, "ratio": 1.1693}')
    values = claims.source_numbers(tmp_path / "r.json")
    assert values == sorted([2045, 1745, 1.70, 3, 1.1693])
    (tmp_path / "r.csv").write_text('strategy,mean\n"selector=random (keep_fraction=0.1)",4.9085\n')
    assert claims.source_numbers(tmp_path / "r.csv") == [0.1, 4.9085]


def write_page(tmp_path, monkeypatch, text, sources=None):
    monkeypatch.setattr(claims, "ROOT", tmp_path)
    (tmp_path / "page.md").write_text(text)
    for name, body in (sources or {}).items():
        (tmp_path / name).write_text(body)
    return claims.audit(["page.md"])


TABLE = "| variant | ms |\n|---|---|\n| a | 2,045 |\n| b | 1.17× |\n"


def test_an_unmarked_table_of_figures_is_an_orphan(tmp_path, monkeypatch):
    r = write_page(tmp_path, monkeypatch, "# Page\n\n" + TABLE)
    assert len(r.orphans) == 2 and any("no source" in p for p in r.problems)


def test_a_sourced_table_is_checked_figure_by_figure(tmp_path, monkeypatch):
    page = "# Page\n\n<!-- claims: source=r.json -->\n\n" + TABLE
    r = write_page(tmp_path, monkeypatch, page, {"r.json": '{"ms": 2045.3, "ratio": 1.1693}'})
    assert not r.orphans and not r.problems and len(r.checked) == 2
    r = write_page(tmp_path, monkeypatch, page, {"r.json": '{"ms": 2045.3, "ratio": 1.19}'})
    assert [o[2] for o in r.orphans] == ["1.17×"]
    r = write_page(tmp_path, monkeypatch, page.replace("r.json", "gone.json"))
    assert any("gone.json" in p for p in r.problems)


def test_a_marker_ends_at_the_next_heading_of_its_level(tmp_path, monkeypatch):
    page = ("# Page\n\n## Old\n\n<!-- claims: historical -->\nMeasured before results were committed: "
            "no committed source.\n\n### Part\n\n" + TABLE + "\n## New\n\n" + TABLE)
    r = write_page(tmp_path, monkeypatch, page)
    assert [t.mode for t in r.tables] == ["historical", "unsourced"] and len(r.orphans) == 2


def test_a_historical_marker_must_say_so_where_readers_see_it(tmp_path, monkeypatch):
    r = write_page(tmp_path, monkeypatch, "# Page\n\n<!-- claims: historical -->\n\n" + TABLE)
    assert any("no committed source" in p for p in r.problems)
    r = write_page(tmp_path, monkeypatch, "# Page\n\n<!-- claims: not-a-result -->\n\n" + TABLE)
    assert any("no reason" in p for p in r.problems)


def test_the_repository_has_no_orphaned_figure():
    """The audit itself, on every page it covers: each table's figures found in its committed sources, or
    the table marked (historical: the page says it has no committed source; not a result: with a reason)."""
    r = claims.audit()
    assert r.tables and r.checked
    assert not r.problems, "\n".join(r.problems)
    assert not r.orphans, "\n".join(f"{p}:{line}: {t} in '{c}'" for p, line, t, c in r.orphans[:40])
    # each source the pages name is committed, not just present in this checkout
    named = sorted({s for t in r.tables for s in t.sources})
    tracked = set(subprocess.run(["git", "ls-files", *named], cwd=ROOT, capture_output=True, text=True).stdout.split())
    untracked = [s for s in named if s not in tracked]
    if (ROOT / ".git").exists():
        assert not untracked, f"sources not committed: {untracked}"


def test_the_benchmarks_table_is_the_generated_summary():
    """docs/benchmarks.md's `make bench` table is bench/results/summary.md (written by
    `bench/run_all.py --summarize` from the committed results files), copied unchanged."""
    summary = (ROOT / "bench" / "results" / "summary.md").read_text()
    table = "\n".join(line for line in summary.splitlines() if line.startswith("|"))
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert table in page
    assert re.search(r"<!-- claims: source=[^>]*bench/results/summary\.json", page)
