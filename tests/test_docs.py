"""The documentation cannot drift from what works.

- The site (mkdocs.yml over docs/, MkDocs Material, the API reference from the docstrings) builds with
  `mkdocs build --strict`: a warning is an error.
- Every ```python block of the README, docs/guides/ and docs/integrations/ runs as printed, read from the
  page: the blocks of one page run in order, in one namespace, in a fresh process whose working directory
  looks like the clone (`data/` and `configs/` linked in). A block preceded by `<!-- norun: REASON -->` is
  skipped (none is today); one preceded by `<!-- slow: REASON -->` runs in a slow test of
  tests/test_readme.py after the page's commands. The ```bash blocks that call `launch/*.py` run there too.
- The README is a front page (at most 150 lines), and no Markdown link of the README, docs/,
  bench/README.md or dataprep/README.md leaves the repository: relative links resolve to a file of the
  checkout (inside docs/ for the site's pages), no absolute paths, no `../shared/`, and web links only to
  project homes.
- The architecture page lists every module that moved in 0.2 (dataflex/_moved.py), each algorithm page
  has an entry per plugin file, and no table row of figures is stated in two files.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
README_MAX_LINES = 150

FENCE = re.compile(r"(?:<!--\s*(?P<mark>norun|slow)\s*:(?P<reason>.*?)-->\s*\n)?^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```\s*$",
                   re.S | re.M)


def blocks(page: Path, lang: str = "python") -> list[tuple[str, str | None]]:
    """(code, mark) of every ```lang block of a page, in order; mark is "norun", "slow" or None."""
    out = []
    for m in FENCE.finditer(page.read_text()):
        if m["lang"] == lang:
            if m["mark"]:
                assert m["reason"].strip(), f"{page}: a <!-- {m['mark']}: --> marker without a reason"
            out.append((m["code"], m["mark"]))
    return out


def runnable_pages() -> list[Path]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs" / "guides").glob("*.md")),
             *sorted((ROOT / "docs" / "integrations").glob("*.md"))]
    return [p for p in pages if any(mark is None for _, mark in blocks(p))]


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# ------------------------------------------------------------------------------------------------ the site

def test_site_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for page in ("index.html", "concepts/architecture/index.html", "reference/grad/index.html",
                 "results/bench-mixers/report/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # the API reference is generated from the docstrings, not empty
    assert "per_sample_grads" in (tmp_path / "site" / "reference" / "grad" / "index.html").read_text()


# --------------------------------------------------------------------------------- code blocks as printed

# what a page needs around it that the page itself cannot hold: files in the working directory, a check
# of what its blocks left behind (run in the blocks' namespace), and the CPU shim for Megatron-core
CHECKS = {
    "README.md": "assert record['step'] == 19 and record['train_loss'] > 0, record",
    "docs/integrations/custom-loop.md": "assert record['step'] == max_steps - 1 and set(record['domain_weights']) "
                                        "== {'prose', 'code', 'math', 'noise'}, record",
    "docs/integrations/deepspeed.md": "assert record['step'] == 9 and flex.world_size == 1",
    "docs/integrations/megatron.md": "assert flex.step == 3 and record['step'] == 2 and record['train_loss'] > 0\n"
                                     "assert flex.state.losses.shape == (8,) and torch.isfinite(flex.state.losses).all()",
    "docs/integrations/huggingface.md": "import pandas as pd\nassert flex.step == 3, flex.step\n"
                                        "assert len(pd.read_parquet('outputs/hf-trainer/ledger')) == 24",
    "docs/integrations/huggingface-trainer.md":
        "import os\nimport pandas as pd\nassert trainer.state.global_step == 4, trainer.state.global_step\n"
        "assert os.path.isfile('runs/hf/checkpoint-2/dataflex_state.pt')\n"
        "assert set(flex.data.names) == {'code', 'chat'} and len(flex.data) == 32\n"
        "assert sft_trainer.flex.step == 2 and sft_trainer.flex.data.names == ['math', 'talk']\n"
        "assert any('mean_token_accuracy' in h for h in sft_trainer.state.log_history)\n"
        "math = sft_trainer.flex.data.sets[0]\n"
        "assert (math.loss_mask.sum(-1).numpy() < math.lengths(list(range(len(math))))).all()  # prompts weigh 0\n"
        "assert dpo_trainer.flex.step == 2 and dpo_trainer.flex.data.names == ['math', 'talk']\n"
        "assert any('rewards/margins' in h for h in dpo_trainer.state.log_history)\n"
        "assert len(pd.read_parquet('runs/dpo/ledger')) == 16  # one row per pair",
    "docs/guides/writing-a-plugin.md": "assert flex.step == 5 and isinstance(flex.engine.of('mixer'), EasyFirst)",
    "docs/guides/data-preparation.md": "assert len(kept) == 2 and dict(steps[-1].stats.dropped) == {'near_duplicate': 1}",
}

RUNNER = r"""
import json, sys, torch
spec = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}

def run():
    for n, code in enumerate(spec["blocks"]):
        exec(compile(code, f"{spec['page']} (python block {n + 1})", "exec"), ns)
    exec(compile(spec["check"], f"{spec['page']} (the test's check)", "exec"), ns)

if spec["megatron"] and not torch.cuda.is_available():
    from dataflex.backends.megatron.cpu_shim import cpu_device
    with cpu_device():
        run()
else:
    run()
print("page ran")
"""


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("docs_cache")


def workdir_like_the_clone(tmp_path: Path) -> Path:
    work = tmp_path / "clone"
    work.mkdir()
    for name in ("data", "configs"):
        (work / name).symlink_to(ROOT / name)
    return work


def prepare(page: str, work: Path) -> None:
    if page in ("docs/integrations/huggingface.md", "docs/integrations/huggingface-trainer.md"):
        # a tiny random Llama and its tokenizer at models/my-model
        from test_hf import save_tiny
        save_tiny(work / "models" / "my-model", "llama")


def page_env(cache: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", DS_ACCELERATOR="cpu", DATAFLEX_CACHE=str(cache),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def run_page(page: Path, work: Path, env: dict, check: str = "", which=(None,), timeout: int = 600):
    code = [c for c, mark in blocks(page) if mark in which]
    spec = work / "page.json"
    spec.write_text(json.dumps({"page": rel(page), "blocks": code, "check": check,
                                "megatron": page.name == "megatron.md"}))
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(spec)], cwd=work, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0 and "page ran" in proc.stdout, \
        f"{rel(page)}: its python blocks failed as printed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.mark.parametrize("page", [rel(p) for p in runnable_pages()])
def test_python_blocks_run_as_printed(page, tmp_path, data_cache):
    work = workdir_like_the_clone(tmp_path)
    prepare(page, work)
    run_page(ROOT / page, work, page_env(data_cache), CHECKS.get(page, ""))


def test_every_page_with_code_is_run_and_checked():
    """A page of the guides or integrations with python blocks is run above, and has a check of its result."""
    pages = {rel(p) for p in runnable_pages()}
    assert {"README.md", "docs/integrations/custom-loop.md", "docs/integrations/huggingface.md",
            "docs/integrations/megatron.md", "docs/integrations/deepspeed.md",
            "docs/guides/writing-a-plugin.md"} <= pages
    assert pages <= set(CHECKS), f"pages run without a check: {sorted(pages - set(CHECKS))}"


def test_readme_loop_is_complete():
    """The front page's loop defines every name it uses (it runs above in a fresh process) and is short."""
    (code,) = [c for c, mark in blocks(ROOT / "README.md") if mark is None]
    assert "from dataflex import dist" not in code and len(code.strip().splitlines()) <= 16


# ----------------------------------------------------------------------------------- front page and links

def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, len(text.splitlines())
    for must in ("make demo", "make test", "pip install .", "dataflex-train", "## Status and limits",
                 "source .venv/bin/activate", "docs/getting-started.md"):
        assert must in text, must
    for verb in ("train", "prep", "compare", "score", "where", "regmix", "corpus"):
        assert f"`{verb}`" in text, verb


WEB_HOMES = {"github.com", "pytorch.org", "huggingface.co", "arxiv.org", "pypi.org", "www.deepspeed.ai",
             "docs.nvidia.com", "squidfunk.github.io", "mkdocstrings.github.io", "www.mkdocs.org"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "dataprep" / "README.md",
            *sorted((ROOT / "docs").rglob("*.md"))]


def links(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)   # not inside code blocks
    text = re.sub(r"`[^`\n]*`", "", text)                                      # nor inline code
    return LINK.findall(text)


def test_no_link_leaves_the_repository():
    bad = []
    docs = ROOT / "docs"
    for page in markdown_files():
        for target in links(page):
            url = urlparse(target)
            if url.scheme in ("http", "https"):
                if url.hostname not in WEB_HOMES:
                    bad.append(f"{rel(page)}: {target} (a web link outside the project homes)")
                continue
            if url.scheme or target.startswith("/") or "shared/" in target:
                bad.append(f"{rel(page)}: {target} (leaves the repository)")
                continue
            path = url.path
            if not path:          # an anchor on the same page
                continue
            resolved = (page.parent / path).resolve()
            if not resolved.exists():
                bad.append(f"{rel(page)}: {target} (no such file)")
            elif ROOT not in resolved.parents:
                bad.append(f"{rel(page)}: {target} (outside the repository)")
            elif docs in page.parents and docs not in resolved.parents:
                bad.append(f"{rel(page)}: {target} (a site page linking outside docs/)")
    assert not bad, "\n".join(bad)


def test_links_are_found():
    """The link check above sees the links (a regression guard for its pattern)."""
    readme = links(ROOT / "README.md")
    assert "docs/getting-started.md" in readme and "docs/benchmarks.md" in readme


# ------------------------------------------------------------------------------------------ page contents

def test_architecture_page_lists_every_move():
    from dataflex._moved import MOVED

    page = (ROOT / "docs" / "concepts" / "architecture.md").read_text()
    for old, homes in MOVED.items():
        row = f"| `{old}` | " + ", ".join(f"`{h}`" for h in homes) + " |"
        assert row in page, f"architecture.md: no row for {old} -> {homes}"


@pytest.mark.parametrize("family", ["mixers", "selectors", "reweighters"])
def test_one_entry_per_plugin_file(family):
    page = (ROOT / "docs" / "algorithms" / f"{family}.md").read_text()
    for f in sorted((ROOT / "dataflex" / family).glob("*.py")):
        if f.name != "__init__.py":
            assert f"`{family}/{f.name}`" in page, f"docs/algorithms/{family}.md has no entry for {f.name}"
    for package in sorted(p.parent for p in (ROOT / "dataflex" / family).glob("*/__init__.py")):
        assert f"`{family}/{package.name}/`" in page, f"docs/algorithms/{family}.md has no entry for {package.name}/"


def test_no_table_of_figures_stated_twice():
    """One figure, one place: a table row holding three or more decimal figures appears in one hand-written
    file only. The results pages launch/compare.py writes (docs/results/NAME/) are left out: sweeps that
    share a baseline run print its row on each page, and they are generated, not edited."""
    seen: dict[tuple, str] = {}
    twice = []
    generated = [p.parent for p in (ROOT / "docs" / "results").glob("*/report.md")]
    for page in markdown_files():
        if page.parent in generated:
            continue
        for line in page.read_text().splitlines():
            if not line.startswith("|"):
                continue
            figures = tuple(re.findall(r"\d+\.\d+", line))
            if len(figures) < 3:
                continue
            where = seen.setdefault(figures, rel(page))
            if where != rel(page):
                twice.append(f"{rel(page)} and {where}: {line[:100]}")
    assert not twice, "\n".join(twice)


def test_benchmarks_page_states_its_provenance():
    """Every table section of the benchmarks page says when and on what it was measured."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    for section in re.split(r"\n## ", text)[1:]:
        if "\n|" in section:
            title = section.splitlines()[0]
            assert re.search(r"20\d\d-\d\d-\d\d", section), f"benchmarks.md, {title}: no date"
            assert re.search(r"load|idle", section), f"benchmarks.md, {title}: no machine load"
