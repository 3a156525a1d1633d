"""Issue 11: kill -9 at a point of the run (inside a step, inside a checkpoint write), then
`trainer.resume=true` in the same run folder: the folder's ledger, metrics and summary equal an
uninterrupted run's, exactly (not after de-duplication), with a mixer, a selector and a reweighter active.

DATAFLEX_FAULT=step:N / checkpoint:N makes launch/train.py SIGKILL itself there (dataflex.run.config.fault)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_launch import ROOT

PY, TRAIN = sys.executable, str(ROOT / "launch" / "train.py")
COMMON = ["backend=torch", "logger=none", "trainer.max_steps=6", "trainer.eval_every=3", "trainer.global_batch_size=8",
          "trainer.max_val_samples=8", "model.d_model=32", "model.seq_len=64", "trainer.ledger_flush_every=3",
          "trainer.checkpoint_every=2", "trainer.plot=false", "+mixer=bandit", "+selector=loss", "+reweighter=loss"]


def launch(args, fault=None, nprocs=1):
    env = dict(os.environ, WANDB_MODE="offline", DS_ACCELERATOR="cpu", HYDRA_FULL_ERROR="0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DATAFLEX_FAULT"):
        env.pop(var, None)
    if fault:
        env["DATAFLEX_FAULT"] = fault
    extra = [f"trainer.nprocs={nprocs}"] if nprocs > 1 else []
    return subprocess.run([PY, TRAIN, *args, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def records(run_dir: Path):
    ledger = pd.read_parquet(run_dir / "ledger").sort_values(["step", "selected", "rank", "sample_id"],
                                                             kind="stable").reset_index(drop=True)
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("wall_time_s", "run_dir"):
        summary.pop(key)
    return ledger, metrics, summary


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = {}

    def get(nprocs=1):
        if nprocs not in out:
            run_dir = tmp_path_factory.mktemp(f"reference{nprocs}") / "run"
            proc = launch([*COMMON, f"hydra.run.dir={run_dir}"], nprocs=nprocs)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out[nprocs] = records(run_dir)
        return out[nprocs]
    return get


def crash_and_resume(run_dir: Path, fault: str, nprocs: int = 1):
    proc = launch([*COMMON, f"hydra.run.dir={run_dir}"], fault=fault, nprocs=nprocs)
    assert proc.returncode != 0, "the fault did not fire"
    assert not (run_dir / "summary.json").exists()
    proc = launch(["trainer.resume=true", f"hydra.run.dir={run_dir}"], nprocs=nprocs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning: resume:" not in proc.stderr.replace("warning: resume: skipping the incomplete", "")
    return proc


def assert_same(run_dir: Path, reference):
    ledger, metrics, summary = records(run_dir)
    ref_ledger, ref_metrics, ref_summary = reference
    pd.testing.assert_frame_equal(ledger, ref_ledger, check_exact=True)
    assert metrics == ref_metrics            # every line once, in order: no repeated or missing step
    assert summary == ref_summary            # tokens, initial loss, steps of the whole run


@pytest.mark.parametrize("fault", ["step:5",      # the default suite's kill -9 and resume
                                   pytest.param("checkpoint:4", marks=pytest.mark.slow),
                                   pytest.param("step:1", marks=pytest.mark.slow)])
def test_kill_then_resume_equals_an_uninterrupted_run(tmp_path, reference, fault):
    """step:5: killed inside step 5 (checkpoint 4 intact, ledger rows of step 5 never written);
    checkpoint:4: killed while writing checkpoint 4 (resumes from 2, skipping the half-written one);
    step:1: killed before any checkpoint (resume=true has nothing to continue: a clear error)."""
    run_dir = tmp_path / "run"
    if fault == "step:1":
        proc = launch([*COMMON, f"hydra.run.dir={run_dir}"], fault=fault)
        assert proc.returncode != 0
        proc = launch(["trainer.resume=true", f"hydra.run.dir={run_dir}"])
        assert proc.returncode == 2 and "train: error: trainer.resume: no complete checkpoint under" in proc.stderr
        assert "Traceback" not in proc.stderr
        return
    proc = crash_and_resume(run_dir, fault)
    if fault.startswith("checkpoint"):
        assert "skipping the incomplete checkpoint" in proc.stderr
        assert f"resuming from {run_dir / 'checkpoints' / 'step_0000002'}" in proc.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step_0000002", "step_0000004", "step_0000006"]
    assert_same(run_dir, reference())


@pytest.mark.slow
def test_kill_then_resume_two_ranks(tmp_path, reference):
    run_dir = tmp_path / "run"
    crash_and_resume(run_dir, "step:3", nprocs=2)
    assert reference(2)[2]["world_size"] == 2
    assert_same(run_dir, reference(2))


def test_checkpoint_is_flushed_and_atomic(tmp_path):
    """One short run killed while writing its second checkpoint: what the first checkpoint covers is on
    disk (ledger rows and metrics of steps 0-1), the half-written one is a `.tmp` folder without a marker."""
    run_dir = tmp_path / "run"
    args = [a for a in COMMON if not a.startswith(("trainer.max_steps", "+selector", "+reweighter"))]
    proc = launch([*args, "trainer.max_steps=4", f"hydra.run.dir={run_dir}"], fault="checkpoint:4")
    assert proc.returncode != 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000004.tmp"]
    assert (run_dir / "checkpoints" / "step_0000002" / "complete.json").is_file()
    assert not (run_dir / "checkpoints" / "step_0000004.tmp" / "complete.json").exists()
    ledger = pd.read_parquet(run_dir / "ledger")
    assert sorted(set(ledger.step)) == [0, 1, 2, 3]       # flushed at each checkpoint, before it counts
    client = __import__("torch").load(run_dir / "checkpoints" / "step_0000002" / "state.pt", weights_only=False)
    run = client["client"]["run"]
    assert run["tokens"] > 0 and run["val_loss_initial"] and run["wall_time_s"] > 0
