"""The documentation's commands cannot drift from what works: the command blocks of the training guide, the
data preparation guide (then its python block that reads the prepared shards back) and the benchmark corpus
page run here, read from the pages, from a clean copy of the checkout, with small step counts; and `make demo`
run twice gives the same outputs twice. All slow (`make test-slow`). The python blocks of the README, the
guides and the integrations run in the default suite (tests/test_docs.py)."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_docs import blocks, run_page
from test_launch import ROOT

from dataflex.utils.dist import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
# appended to (or replacing the values of) every README training command: a few small steps
SMALL = {"trainer.max_steps": "2", "trainer.eval_every": "2", "trainer.global_batch_size": "8",
         "trainer.max_val_samples": "4", "model.d_model": "32", "model.seq_len": "64", "trainer.probe_batch_size": "8"}


def page_blocks(page: str, lang: str) -> list[str]:
    """The code blocks (```lang) of a documentation page, in order."""
    return [code for code, _ in blocks(ROOT / page, lang)]


def commands(block: str) -> list[list[str]]:
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip() and not line.startswith("#")]


def clean_clone(tmp_path: Path) -> Path:
    """The checkout's code, configs and corpus, without outputs or caches; the venv linked in."""
    clone = tmp_path / "clone"
    keep = ("launch", "configs", "data", "dataflex", "dataprep", "Makefile", "setup.py", "pyproject.toml", "README.md")
    for name in keep:
        src = ROOT / name
        if not src.exists():
            continue
        if src.is_dir():
            shutil.copytree(src, clone / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            clone.mkdir(exist_ok=True)
            shutil.copy2(src, clone / name)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    return clone


def env_for(cache: Path) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", DS_ACCELERATOR="cpu", DATAFLEX_CACHE=str(cache),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def shell(argv, cwd, env, timeout=600):
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{argv} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def as_run(argv: list[str], run_dir: str | None = None, small: bool = True) -> list[str]:
    """A README command as the test runs it: this interpreter, a free port for `deepspeed`, small sizes."""
    argv = list(argv)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "deepspeed":
        argv[0:1] = [str(BIN / "deepspeed"), "--master_port", str(free_port())]
    if small:
        given = {a.split("=", 1)[0]: i for i, a in enumerate(argv) if "=" in a and not a.startswith("-")}
        for key, value in SMALL.items():
            if key in given:
                argv[given[key]] = f"{key}={value}"
            else:
                argv.append(f"{key}={value}")
        for key, value in (("trainer.checkpoint_every", "1"),):
            if key in given:
                argv[given[key]] = f"{key}={value}"
    if run_dir:
        argv.append(f"hydra.run.dir={run_dir}")
    return argv


def test_training_section(tmp_path):
    clone, env = clean_clone(tmp_path), env_for(tmp_path / "cache")
    block = page_blocks("docs/guides/training.md", "bash")[0]
    # then the command blocks of the DeepSpeed and Megatron-core pages
    more = [c for page in ("docs/integrations/deepspeed.md", "docs/integrations/megatron.md")
            for b in page_blocks(page, "bash") for c in commands(b)]
    previous = None
    for n, argv in enumerate(commands(block) + more):
        resume = [a for a in argv if a.startswith("trainer.resume=")]
        run_dir = f"outputs/readme/{n}"
        if resume:  # outputs/DATE/TIME/checkpoints/step_0000100 -> a checkpoint of the run before
            ckpt = sorted((clone / previous / "checkpoints").glob("step_*"))[0]   # step 1 of 2
            argv = [f"trainer.resume={ckpt}" if a in resume else a for a in argv]
            proc = shell(as_run(argv, run_dir, small=False), clone, env)  # its settings come from its run folder
            assert "warning: resume" not in proc.stderr
        else:
            proc = shell(as_run(argv, run_dir), clone, env)
        assert "val loss start" in proc.stdout, argv
        summary = json.loads((clone / run_dir / "summary.json").read_text())
        assert summary["steps"] == 2, (argv, summary["steps"])
        assert "val loss start" in (clone / run_dir / "train.log").read_text()
        previous = run_dir


def test_preparing_data_section(tmp_path):
    clone, env = clean_clone(tmp_path), env_for(tmp_path / "cache")
    conf = tmp_path / "DIR"
    (conf / "data").mkdir(parents=True)
    (conf / "data" / "mine.yaml").write_text(
        "domains:\n"
        f"  prose: {{train: {clone}/data/default/prose/val.jsonl, val: {clone}/data/default/prose/val.jsonl}}\n"
        f"  math: {{train: {clone}/data/default/math/val.jsonl}}\n"
        f"tokenizer: {clone}/data/default/tokenizer.json\n")
    # DIR/data/prepped.yaml exactly as the README shows it
    (yaml_block,) = [b for b in page_blocks("docs/guides/data-preparation.md", "yaml") if "manifest:" in b]
    (conf / "data" / "prepped.yaml").write_text(yaml_block.replace("outputs/", f"{clone}/outputs/"))
    block = page_blocks("docs/guides/data-preparation.md", "bash")[0]
    run_dir = None
    for argv in commands(block):
        argv = [str(conf) if a == "DIR" else a for a in argv]
        if argv[1].endswith("prep.py"):
            proc = shell(as_run(argv + ["prep.execution.progress=false"], small=False), clone, env)
            assert "prep: wrote outputs/prep/" in proc.stdout and "dropped by step and reason" in proc.stdout
        elif argv[1].endswith("train.py"):
            run_dir = "outputs/readme/prepped"
            proc = shell(as_run(argv, run_dir), clone, env)
            assert set(json.loads((clone / run_dir / "summary.json").read_text())["domain_weights"]) == {
                "prose", "code", "math"}
        else:  # where.py RUN_DIR SAMPLE_ID
            sample = int(pd.read_parquet(clone / run_dir / "ledger").sample_id.iloc[0])
            argv = [str(clone / run_dir) if a == "RUN_DIR" else str(sample) if a == "SAMPLE_ID" else a for a in argv]
            proc = shell(as_run(argv, small=False), clone, env)
            assert re.search(r"<- \S+\.jsonl:\d+ \(line\)", proc.stdout), proc.stdout
    assert (clone / "outputs/prep/default/default/manifest.json").is_file()
    assert (clone / "outputs/prep/default/minimal/manifest.json").is_file()
    assert (clone / "outputs/prep/mine/default/manifest.json").is_file()
    # the page's python block that reads the prepared shards back, as printed, in the clone
    run_page(ROOT / "docs/guides/data-preparation.md", clone, env, "assert data['prose']['train'] and str(tok).endswith('tokenizer.json')",
             which=("slow",))


def test_make_demo_twice_gives_the_same_outputs(tmp_path):
    clone, env = clean_clone(tmp_path), env_for(tmp_path / "cache")
    # -o: the linked venv is the checkout's own; never reinstall the clone into it
    args = ["make", "-o", ".venv/.installed", "demo", "DEMO_ARGS=trainer.max_steps=6 trainer.eval_every=3 model.d_model=32"]
    first = {}
    for attempt in (1, 2):
        proc = shell(args, clone, env, timeout=900)
        assert "mixer=bandit" in proc.stdout and "wrote outputs/demo/comparison.md" in proc.stdout
        for run in ("bandit", "static"):
            lines = [json.loads(x) for x in (clone / "outputs/demo" / run / "metrics.jsonl").read_text().splitlines()]
            assert [x["step"] for x in lines if "train_loss" in x] == list(range(6))
            if attempt == 1:
                first[run] = lines
            else:
                assert [x.get("train_loss") for x in lines] == [x.get("train_loss") for x in first[run]]
                assert [x.get("val_loss") for x in lines] == [x.get("val_loss") for x in first[run]]
        assert len(list((clone / "outputs/demo/bandit/wandb").glob("offline-run-*"))) == 1


def test_benchmark_corpus_section(tmp_path):
    """The benchmark corpus built by the README's command (into this test's cache), then trained on."""
    clone, env = clean_clone(tmp_path), env_for(tmp_path / "cache")
    (block,) = page_blocks("docs/data/benchmark-corpus.md", "bash")
    for n, argv in enumerate(commands(block)):
        if argv[1].endswith("bench_corpus.py"):
            proc = shell(as_run(argv, small=False), clone, env, timeout=900)
            assert "train on it with data=bench" in proc.stdout
            assert (tmp_path / "cache" / "bench_corpus" / "corpus.json").is_file()
        else:
            run_dir = f"outputs/readme/bench{n}"
            shell(as_run(argv, run_dir), clone, env)
            summary = json.loads((clone / run_dir / "summary.json").read_text())
            assert len(summary["domain_weights"]) == 7 and summary["steps"] == 2
