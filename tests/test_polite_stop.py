"""Issue 20: polite to schedulers. SIGTERM (or Ctrl-C) inside a step finishes that step, flushes the ledger
and metrics, writes a checkpoint, writes summary.json marked interrupted and exits 143 (130); a resume
continues to the same ledger, metrics and summary as an uninterrupted run. One writer per run folder:
a second run into a folder a running training holds is refused, naming its pid, and touches nothing.

DATAFLEX_FAULT=sigterm:N makes rank 0 send itself SIGTERM inside step N (dataflex.run.faults)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from test_crash_resume import COMMON, assert_same, launch, records
from test_launch import ROOT

PY, TRAIN = sys.executable, str(ROOT / "launch" / "train.py")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = launch([*COMMON, f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return records(run_dir)


def test_sigterm_at_a_step_then_resume_equals_an_uninterrupted_run(tmp_path, reference):
    """SIGTERM inside step 2 (0-based) of 6, checkpoints every 2: step 2 finishes, an extra checkpoint at 3."""
    run_dir = tmp_path / "run"
    proc = launch([*COMMON, f"hydra.run.dir={run_dir}"], fault="sigterm:2")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert "SIGTERM received: finishing this step" in proc.stderr
    assert "stopped by SIGTERM after step 3; continue with trainer.resume=latest" in proc.stderr
    assert "Traceback" not in proc.stderr
    ledger = pd.read_parquet(run_dir / "ledger")
    assert sorted(set(ledger.step)) == [0, 1, 2]                 # every trained step, none lost
    assert ledger[ledger.selected].groupby("step")["row"].nunique().tolist() == [8] * 3    # packed: 8 rows a step
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train_loss" in m] == [0, 1, 2]
    summary = json.loads((run_dir / "summary.json").read_text())
    ckpt = run_dir / "checkpoints" / "step_0000003"
    assert summary["interrupted"] == {"signal": "SIGTERM", "steps_done": 3, "max_steps": 6, "checkpoint": str(ckpt)}
    assert summary["steps"] == 3
    assert (ckpt / "complete.json").is_file() and (ckpt / "state.pt").is_file()
    assert not (run_dir / ".dataflex.lock").exists() or os.path.getsize(run_dir / ".dataflex.lock") > 0

    proc = launch(["trainer.resume=latest", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/6" in proc.stderr               # it continued from the checkpoint the stop wrote
    assert_same(run_dir, reference)        # the same ledger, metrics and summary (no `interrupted` left)


def test_sigterm_without_checkpoints_still_records(tmp_path):
    """trainer.checkpoint_every=0: no checkpoint, but the ledger, metrics and an interrupted summary."""
    run_dir = tmp_path / "run"
    args = [a for a in COMMON if not a.startswith("trainer.checkpoint_every")]
    proc = launch([*args, "trainer.checkpoint_every=0", f"hydra.run.dir={run_dir}"], fault="sigterm:1")
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert sorted(set(pd.read_parquet(run_dir / "ledger").step)) == [0, 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"]["checkpoint"] is None and summary["steps"] == 2
    assert not (run_dir / "checkpoints").exists()


def test_a_second_run_into_a_running_folder_is_refused(tmp_path):
    """The first run holds RUN_DIR/.dataflex.lock; the second is refused with exit 2 naming its pid, and
    leaves the folder (its .hydra/, train.log, metrics) exactly as it was."""
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DATAFLEX_FAULT",
                "DATAFLEX_RUN_LOCK"):
        env.pop(var, None)
    first = subprocess.Popen([PY, TRAIN, *COMMON, "trainer.max_steps=2000", "trainer.eval_every=1000",
                              f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (run_dir / "metrics.jsonl").exists():       # training has started
            assert first.poll() is None and time.time() < deadline, "the first run did not start"
            time.sleep(0.5)
        before = {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()}
        log_size = (run_dir / "train.log").stat().st_size
        second = launch(["backend=torch", "logger=none", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"])
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"train: error: {run_dir} is in use by a running training (pid {first.pid} on" in second.stderr
        assert "Traceback" not in second.stderr
        assert {p: p.stat().st_mtime_ns for p in (run_dir / ".hydra").iterdir()} == before
        assert (run_dir / "train.log").stat().st_size >= log_size and first.poll() is None
        # a polite stop of the first one; then the folder is free again (its resume is accepted)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert json.loads((run_dir / "summary.json").read_text())["interrupted"]["signal"] == "SIGTERM"
    proc = launch(["trainer.resume=latest", "trainer.max_steps=2000", "trainer.eval_every=1000",
                   f"hydra.run.dir={run_dir}"], fault="sigterm:" + str(json.loads(
                       (run_dir / "summary.json").read_text())["steps"] + 1))
    assert proc.returncode == 143, proc.stderr[-3000:]


def start_two_ranks(run_dir: Path) -> subprocess.Popen:
    """A `trainer.nprocs=2` run of 2000 steps started as a user starts it (no launcher variables inherited),
    returned once it has written its first metrics."""
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DATAFLEX_FAULT",
                "DATAFLEX_RUN_LOCK", "DATAFLEX_LAUNCHER_PID"):
        env.pop(var, None)
    proc = subprocess.Popen([PY, TRAIN, *COMMON, "trainer.nprocs=2", "trainer.max_steps=2000",
                             "trainer.eval_every=1000", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "metrics.jsonl").exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            proc.wait()
            raise AssertionError("the job did not start")
        time.sleep(0.5)
    return proc


@pytest.mark.slow
def test_sigterm_to_the_launcher_of_two_ranks_stops_all_of_them(tmp_path):
    """`trainer.nprocs=2`: SIGTERM to the process the user started reaches both ranks, which agree on a
    step, checkpoint and stop; the launcher exits 143 and no process of the job is left within 30 s."""
    run_dir = tmp_path / "run"
    proc = start_two_ranks(run_dir)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.time() + 30
    while subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True).returncode == 0:
        assert time.time() < deadline, "a process of the job is still running 30 s after the stop"
        time.sleep(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"]["signal"] == "SIGTERM" and summary["world_size"] == 2
    assert Path(summary["interrupted"]["checkpoint"]).is_dir()
    ledger = pd.read_parquet(run_dir / "ledger")
    assert sorted(set(ledger.step)) == list(range(summary["steps"])) and {0, 1} <= set(ledger["rank"])


@pytest.mark.slow
def test_kill_9_of_the_launcher_of_two_ranks_leaves_no_process(tmp_path):
    """`trainer.nprocs=2` and the process the user started killed outright (SIGKILL forwards nothing): the
    ranks notice their launcher is gone and stop (politely: the ledger and summary.json are written), and no
    process of the job is left 30 s later."""
    run_dir = tmp_path / "run"
    proc = start_two_ranks(run_dir)
    try:
        assert subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True,
                              text=True).stdout.split().__len__() >= 3     # the launcher and two ranks
        proc.kill()
        killed = time.time()
        while subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True).returncode == 0:
            assert time.time() < killed + 30, "a process of the job is still running 30 s after the kill -9"
            time.sleep(1)
    finally:
        proc.wait()
        left = subprocess.run(["pgrep", "-f", f"hydra.run.dir={run_dir}"], capture_output=True, text=True).stdout
        for pid in left.split():
            os.kill(int(pid), signal.SIGKILL)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["interrupted"]["signal"] == "SIGTERM" and summary["world_size"] == 2
    ledger = pd.read_parquet(run_dir / "ledger")
    assert sorted(set(ledger.step)) == list(range(summary["steps"]))


def test_a_rank_notices_its_launcher_is_gone(tmp_path):
    """watch_launcher in a process whose DATAFLEX_LAUNCHER_PID names a process that is killed: it gets SIGTERM
    within a couple of seconds (here: its handler writes a file and exits 143)."""
    import textwrap

    launcher = subprocess.Popen(["sleep", "300"])
    child = subprocess.Popen([PY, "-c", textwrap.dedent(f"""
        import signal, sys, time
        from dataflex.run.stopping import watch_launcher
        def handle(signum, frame):
            open({str(tmp_path / 'got')!r}, 'w').write(str(signum))
            sys.exit(143)
        signal.signal(signal.SIGTERM, handle)
        assert watch_launcher(poll_s=0.2) is not None
        print('watching', flush=True)
        time.sleep(60)
        """)], cwd=ROOT, env=dict(os.environ, RANK="1", PYTHONPATH=str(ROOT),
                                  DATAFLEX_LAUNCHER_PID=f"{launcher.pid}:"), stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"watching"
        time.sleep(1)
        assert child.poll() is None                  # its launcher lives: it keeps running
        launcher.kill()                              # left a zombie until waited for: counted as gone
        started = time.time()
        assert child.wait(timeout=20) == 143
        assert time.time() - started < 5
        assert (tmp_path / "got").read_text() == str(int(signal.SIGTERM))
    finally:
        for p in (launcher, child):
            if p.poll() is None:
                p.kill()
            p.wait()
