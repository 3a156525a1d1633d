"""End to end through the real launchers: DeepSpeed's (one and two processes), plain python, sweeps."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from dataflex.utils.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
FAST = ["trainer.max_steps=6", "trainer.eval_every=3", "trainer.global_batch_size=8", "trainer.max_val_samples=8",
        "model.d_model=32", "model.seq_len=64", "trainer.ledger_flush_every=4"]


def run(args, cwd=ROOT, check=True, timeout=600):
    env = dict(os.environ, WANDB_MODE="offline", DS_ACCELERATOR="cpu", HYDRA_FULL_ERROR="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 and ("EADDRINUSE" in proc.stderr or "already in use" in proc.stderr):  # port taken meanwhile
        args = [str(free_port()) if i and args[i - 1] == "--master_port" else a for i, a in enumerate(args)]
        proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def deepspeed(*args):
    """The DeepSpeed launcher; a port of its own, since tests run in parallel (its default is 29500)."""
    return [str(Path(sys.executable).parent / "deepspeed"), "--master_port", str(free_port()), *args]


def check_outputs(run_dir: Path, steps: int, global_batch: int, ranks: set, wandb: bool):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "domain_weights.png", "samples.parquet"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    step_lines = [x for x in lines if "train_loss" in x]
    assert [x["step"] for x in step_lines] == list(range(steps))
    domains = {"prose", "code", "math", "noise"}
    for x in step_lines:
        assert set(x["domain_weights"]) == domains
        assert abs(sum(x["domain_weights"].values()) - 1) < 1e-9
        assert set(x["domain_loss"]) <= domains and x["domain_loss"]
    evals = [x for x in lines if "val_loss" in x]
    assert evals and set(evals[-1]["val_loss"]) == domains
    ledger = pd.read_parquet(run_dir / "ledger")
    assert {"step", "rank", "sample_id", "domain", "selected", "weight", "loss"} <= set(ledger.columns)
    kept = ledger[ledger.selected]
    if OmegaConf.load(run_dir / "config.yaml").trainer.get("packing"):     # rows of several samples: every row used
        assert kept.groupby("step")["row"].nunique().tolist() == [global_batch] * steps
        assert not kept.duplicated(["step", "sample_id"]).any()
    else:
        assert len(kept) == steps * global_batch
    assert set(kept["rank"]) == ranks
    samples = pd.read_parquet(run_dir / "samples.parquet")
    joined = kept.merge(samples, on="sample_id", suffixes=("", "_src"))
    assert (joined.domain == joined.domain_src).all() and joined.doc_id.str.contains(r"\.jsonl:\d+$").all()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps and set(summary["val_loss"]) == domains and summary["tokens"] > 0
    if wandb:
        assert list((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    return ledger, summary


def shm_left_by(proc) -> list:
    """DeepSpeed's CPU comm buffers of a launched run still in /dev/shm (named by its uid and port; 66 MB each)."""
    port = proc.args[proc.args.index("--master_port") + 1]
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"))


def test_deepspeed_launcher_main_command(tmp_path):
    """`deepspeed launch/train.py +mixer=bandit` exactly as typed (the launcher adds --local_rank); it leaves no
    shared memory behind."""
    proc = run(deepspeed("launch/train.py", "+mixer=bandit", *FAST, f"hydra.run.dir={tmp_path}"))
    assert "val loss start" in proc.stdout
    assert not shm_left_by(proc)
    _, summary = check_outputs(tmp_path, 6, 8, {0}, wandb=True)
    assert summary["strategy"]["mixer"] == "bandit" and summary["backend"] == "deepspeed"


def test_two_processes_all_three_families(tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # padded rows: the selector keeps exactly half of each step's candidates (packed steps: tests/test_packing.py)
    proc = run(deepspeed("--num_gpus", "2", str(ROOT / "launch" / "train.py"), "+mixer=bandit", "+selector=loss",
                         "+reweighter=loss", "reweighter.burnout_steps=2", "backend.zero_stage=2", "logger=none",
                         "trainer.packing=false", *FAST, f"hydra.run.dir={tmp_path / 'run'}"), cwd=cwd)
    assert not shm_left_by(proc)            # both ranks' comm buffers unlinked (dataflex.backends.extensions)
    ledger, summary = check_outputs(tmp_path / "run", 6, 8, {0, 1}, wandb=False)
    assert summary["world_size"] == 2
    assert (ledger.groupby("step").selected.mean() == 0.5).all()
    late = ledger[ledger.selected & (ledger.step >= 2)].groupby("step").weight
    assert (late.mean().round(9) == 1).all() and (late.std() > 0).all()
    assert not list(cwd.iterdir())  # no rank left its own run directory or log behind


def test_plain_python_torch_backend(tmp_path):
    run([sys.executable, "launch/train.py", "backend=torch", "+mixer=static", "logger=none", *FAST,
         f"hydra.run.dir={tmp_path}"])
    ledger, _ = check_outputs(tmp_path, 6, 8, {0}, wandb=False)
    assert (ledger.weight == 1).all()


def test_resume_continues_exactly(tmp_path):
    common = [sys.executable, "launch/train.py", "logger=none", "+mixer=bandit", "+selector=loss",
              "+reweighter=loss", "reweighter.burnout_steps=1", *FAST, "trainer.max_steps=8"]
    run(common + ["trainer.checkpoint_every=4", f"hydra.run.dir={tmp_path / 'full'}"])
    ckpt = tmp_path / "full" / "checkpoints" / "step_0000004"
    run(common + [f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    full = pd.read_parquet(tmp_path / "full" / "ledger")
    resumed = pd.read_parquet(tmp_path / "resumed" / "ledger")
    pd.testing.assert_frame_equal(full[full.step >= 4].reset_index(drop=True), resumed, check_exact=True)


def test_sweep_of_two_process_jobs_and_compare(tmp_path):
    """The sweep is the outer process; each job starts its own two ranks (torchrun here)."""
    run([sys.executable, "launch/train.py", "-m", "backend=torch", "trainer.nprocs=2", "+mixer=static,bandit",
         "logger=none", *FAST, f"hydra.sweep.dir={tmp_path}"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        ledger, summary = check_outputs(tmp_path / job, 6, 8, {0, 1}, wandb=False)
        assert summary["world_size"] == 2
    proc = run([sys.executable, "launch/compare.py", str(tmp_path)])
    assert "mixer=static" in proc.stdout and "mixer=bandit" in proc.stdout
    for name in ("comparison.md", "comparison.csv", "comparison.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize("case", ["missing", "malformed", "no_text", "empty"])
def test_bad_data_is_named(tmp_path, case):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a perfectly fine document " * 4}) + "\n")
    bad = tmp_path / "bad.jsonl"
    contents = {"missing": None, "malformed": '{"text": "ok"}\n{"text": oops\n',
                "no_text": '{"text": "ok"}\n{"body": "no text here"}\n', "empty": ""}[case]
    if contents is not None:
        bad.write_text(contents)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        f"domains:\n  good: {{train: {good}}}\n  bad: {{train: {bad}}}\ntokenizer: {ROOT}/data/default/tokenizer.json\n")
    proc = run([sys.executable, "launch/train.py", "backend=torch", "logger=none", "--config-dir", str(tmp_path),
                "data=mine", f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert proc.returncode != 0
    expected = {"missing": f"data.domains.bad.train: input not found: '{bad}'",
                "malformed": f"{bad}:2: malformed JSON", "no_text": f"{bad}:2: record has no string 'text' field",
                "empty": "data.domains.bad.train: no documents"}[case]
    assert expected in proc.stderr
    assert str(tmp_path / "data" / "mine.yaml") in proc.stderr


def test_unknown_plugin_lists_available():
    proc = run([sys.executable, "launch/train.py", "+mixer=nope"], check=False)
    assert proc.returncode != 0
    assert "mixer/nope" in proc.stderr and "bandit" in proc.stderr and "static" in proc.stderr


def test_minimal_user_data_config(tmp_path):
    """Only `domains` (train/val) and `target`: everything else has defaults."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        "domains:\n"
        f"  books: {{train: {ROOT}/data/default/prose/val.jsonl, val: {ROOT}/data/default/prose/val.jsonl}}\n"
        f"  arith: {{train: {ROOT}/data/default/math/val.jsonl}}\n"
        f"target: {{val: {ROOT}/data/default/math/val.jsonl}}\n")
    run([sys.executable, "launch/train.py", "backend=torch", "logger=none", "--config-dir", str(tmp_path), "data=mine",
         "+mixer=bandit", *FAST, f"hydra.run.dir={tmp_path / 'run'}"])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["domain_weights"]) == {"books", "arith"} and set(summary["val_loss"]) == {"books"}


def test_two_ranks_zero3_with_probes(tmp_path):
    """Under ZeRO-3 every forward is a collective: probes (selector candidates, uneven validation
    shares) must run the same number of forwards on every rank, or the run hangs."""
    run(deepspeed("--num_gpus", "2", "launch/train.py", "backend.zero_stage=3", "+selector=loss", "+mixer=bandit",
                  "logger=none", *FAST, "trainer.max_val_samples=3", "trainer.probe_batch_size=4",
                  f"hydra.run.dir={tmp_path}"), timeout=300)
    check_outputs(tmp_path, 6, 8, {0, 1}, wandb=False)
