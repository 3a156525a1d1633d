"""Issue 12, "the first hour": each problem a new user hit, as a test of the message or behaviour that
replaces it. Launches use the torch back end and a few steps (DeepSpeed launches live in test_launch.py
and test_readme.py)."""
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_launch import FAST, ROOT, run

PY = sys.executable
TRAIN = str(ROOT / "launch" / "train.py")
PREP = str(ROOT / "launch" / "prep.py")
TORCH = ["backend=torch", "logger=none", *FAST]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One short run with checkpoints at steps 3 and 6 (FAST: 6 steps), shared read-only."""
    run_dir = tmp_path_factory.mktemp("first_hour") / "run"
    proc = run([PY, TRAIN, *TORCH, "trainer.checkpoint_every=3", f"hydra.run.dir={run_dir}"])
    return run_dir, proc


def metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# 1. ports ---------------------------------------------------------------------------------------------

def test_make_demo_gives_every_launch_a_free_port():
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    launches = [line for line in dry.splitlines() if line.startswith("deepspeed ")]
    assert len(launches) == 2
    ports = [int(re.search(r"--master_port (\d+)", line).group(1)) for line in launches]
    assert ports[0] != 29500 and ports[1] != 29500
    for port in ports:  # free when chosen
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_port_clash_is_named_in_one_line(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")
        proc = subprocess.run([PY, TRAIN, *TORCH], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "already in use" in x)
    assert line.startswith(f"train: error: port {port} (MASTER_PORT) is already in use") and "--master_port" in line
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()  # 8: no empty timestamped folder left behind


# 2. a fresh run never appends to another run's folder ------------------------------------------------

def test_fresh_run_into_used_folder_refuses(finished_run, tmp_path):
    src, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    before = metrics(run_dir)
    proc = run([PY, TRAIN, *TORCH, f"hydra.run.dir={run_dir}"], check=False)
    assert proc.returncode != 0
    assert f"train: error: {run_dir} already holds a run" in proc.stderr and "trainer.overwrite=true" in proc.stderr
    assert metrics(run_dir) == before
    assert "already holds a run" in (run_dir / "train.log").read_text()  # 8: errors land in train.log
    assert (run_dir / "checkpoints").is_dir()  # a refused run removes nothing


@pytest.mark.slow
def test_fresh_run_with_overwrite_starts_clean(finished_run, tmp_path):
    src, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    before = metrics(run_dir)
    run([PY, TRAIN, *TORCH, "trainer.overwrite=true", f"hydra.run.dir={run_dir}"])
    after = metrics(run_dir)
    assert [x["step"] for x in after] == [x["step"] for x in before]  # not appended: 2 x the lines
    assert [x.get("train_loss") for x in after] == [x.get("train_loss") for x in metrics(src)]
    assert not (run_dir / "checkpoints").exists()  # the old run's checkpoints went with it
    assert (run_dir / "train.log").read_text().count("outputs: ") == 1


# 3. manifests: domains / exclude; 4. prep output_dir per chain; 8. prep summary and quiet ------------

@pytest.fixture(scope="module")
def prepared_default(tmp_path_factory):
    """The README's `prep.py data=default` (default chain, which drops `noise`) into a temp folder."""
    out = tmp_path_factory.mktemp("prep") / "default"
    proc = run([PY, PREP, "data=default", f"prep.output_dir={out}", "prep.execution.progress=false"])
    return out / "manifest.json", proc


def test_prep_ends_with_a_summary_and_no_third_party_noise(prepared_default):
    manifest, proc = prepared_default
    out = proc.stdout
    assert f"prep: wrote {manifest}" in out
    assert re.search(r"read 1,\d{3} records from 8 input file\(s\); kept 1,\d{3} documents", out)
    assert re.search(r"quality_filter\s+\d+\s+mean_word_length \d+", out)  # dropped by step and reason
    row = next(x for x in out.splitlines() if x.strip().startswith("noise"))
    assert row.split()[2] == "0"  # noise: read N, kept 0
    assert "`exclude: [noise]`" in out
    assert len(out.splitlines()) < 30  # one screen
    for noise in ("Transformer Engine", "Apex", "Megatron-FSDP", "UserWarning"):
        assert noise not in proc.stdout + proc.stderr


def test_manifest_domains_and_exclude(prepared_default):
    from dataflex.data.domains import load_domains
    from dataflex.utils.errors import DataConfigError

    manifest = str(prepared_default[0])
    with pytest.raises(DataConfigError, match=r"domain 'noise' has no training documents .*`exclude: \[noise\]`"):
        load_domains({"manifest": manifest}, seq_len=64)
    assert set(load_domains({"manifest": manifest, "exclude": ["noise"]}, seq_len=64).train) == {"prose", "code", "math"}
    assert list(load_domains({"manifest": manifest, "domains": ["math", "prose"]}, seq_len=64).train) == ["math", "prose"]
    with pytest.raises(DataConfigError, match=r"data.exclude: domain\(s\) \['poetry'\] not in"):
        load_domains({"manifest": manifest, "exclude": ["poetry"]}, seq_len=64)


def test_training_on_a_manifest_is_quiet_unless_verbose(prepared_default, tmp_path):
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "prepped.yaml").write_text(f"manifest: {prepared_default[0]}\nexclude: [noise]\n")
    args = [PY, TRAIN, "--config-dir", str(tmp_path / "conf"), "data=prepped", *TORCH, "trainer.max_steps=2"]
    proc = run(args + [f"hydra.run.dir={tmp_path / 'quiet'}"])
    output = proc.stdout + proc.stderr
    assert "[INFO]" not in output and "Transformer Engine" not in output, output[-3000:]
    summary = json.loads((tmp_path / "quiet" / "summary.json").read_text())
    assert set(summary["domain_weights"]) == {"prose", "code", "math"}


@pytest.mark.slow
def test_verbose_brings_third_party_logging_back(prepared_default, tmp_path):
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "prepped.yaml").write_text(f"manifest: {prepared_default[0]}\nexclude: [noise]\n")
    proc = run([PY, TRAIN, "--config-dir", str(tmp_path / "conf"), "data=prepped", *TORCH, "trainer.max_steps=2",
                "logger.verbose=true", f"hydra.run.dir={tmp_path / 'verbose'}"])
    assert "[megatron" in proc.stdout + proc.stderr


def test_prep_default_output_dir_names_the_chain(tmp_path):
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "data" / "small.yaml").write_text(
        f"domains:\n  math: {{train: {ROOT}/data/default/math/val.jsonl}}\ntokenizer: {ROOT}/data/default/tokenizer.json\n")
    run([PY, PREP, "--config-dir", str(tmp_path / "conf"), "data=small", "prep=minimal", "prep.execution.workers=1",
         "prep.execution.progress=false"], cwd=tmp_path)
    assert (tmp_path / "outputs" / "prep" / "small" / "minimal" / "manifest.json").is_file()
    assert not (tmp_path / "outputs" / "prep" / "small" / "manifest.json").exists()


# 5. resume ----------------------------------------------------------------------------------------------

def test_resume_takes_the_runs_own_config(finished_run, tmp_path):
    src, _ = finished_run
    ckpt = src / "checkpoints" / "step_0000003"
    # nothing but the checkpoint: model size, steps, batch come from src/config.yaml
    proc = run([PY, TRAIN, f"trainer.resume={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    assert "warning: resume" not in proc.stderr
    full = pd.read_parquet(src / "ledger")
    resumed = pd.read_parquet(tmp_path / "resumed" / "ledger")
    pd.testing.assert_frame_equal(full[full.step >= 3].reset_index(drop=True), resumed, check_exact=True)


def test_resume_names_overrides_that_change_the_trajectory(finished_run, tmp_path):
    src, _ = finished_run
    proc = run([PY, TRAIN, f"trainer.resume={src / 'checkpoints' / 'step_0000003'}", "trainer.max_steps=4",
                "trainer.eval_every=4", f"hydra.run.dir={tmp_path / 'shorter'}"])
    warnings = [x for x in proc.stderr.splitlines() if x.startswith("warning: resume:")]
    assert len(warnings) == 1, proc.stderr[-2000:]  # eval_every does not change the trajectory
    assert "trainer.max_steps=4 differs from the run's trainer.max_steps=6" in warnings[0]
    assert str(src / "config.yaml") in warnings[0]
    assert json.loads((tmp_path / "shorter" / "summary.json").read_text())["steps"] == 4
    assert warnings[0] in (tmp_path / "shorter" / "train.log").read_text()


def test_resume_latest_continues_its_own_folder(finished_run, tmp_path):
    src, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_0000006")  # as if killed after step 3's checkpoint
    run([PY, TRAIN, "trainer.resume=latest", f"hydra.run.dir={run_dir}"])
    steps = [x["step"] for x in metrics(run_dir) if "train_loss" in x]
    assert steps == list(range(6))  # no step twice
    assert [x.get("train_loss") for x in metrics(run_dir)] == [x.get("train_loss") for x in metrics(src)]
    ledger = pd.read_parquet(run_dir / "ledger")
    pd.testing.assert_frame_equal(ledger.sort_values(["step", "rank", "sample_id"]).reset_index(drop=True),
                                  pd.read_parquet(src / "ledger").sort_values(["step", "rank", "sample_id"])
                                  .reset_index(drop=True), check_exact=True)


# 6. README: running by hand -------------------------------------------------------------------------------

@pytest.mark.parametrize("page", ["README.md", "docs/getting-started.md"])
def test_readme_says_how_to_run_by_hand(page):
    text = (ROOT / page).read_text()
    assert "source .venv/bin/activate" in text
    assert "DS_ACCELERATOR=cpu" in text and "WANDB_MODE=offline" in text


# 7. typos in trainer keys ---------------------------------------------------------------------------------

@pytest.mark.parametrize("typo", ["trainer.max_step=10", "+trainer.max_step=10", "++trainer.max_step=10"])
def test_unknown_trainer_key_refused(tmp_path, typo):
    proc = run([PY, TRAIN, typo], cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "train: error: trainer.max_step: unknown trainer setting (did you mean trainer.max_steps?" in proc.stderr
    assert not (tmp_path / "outputs").exists()  # 8: a failed run leaves no empty timestamped folder


# 8. train.log --------------------------------------------------------------------------------------------

def test_train_log_holds_the_console(finished_run):
    run_dir, proc = finished_run
    log = (run_dir / "train.log").read_text()
    assert "val loss start" in proc.stdout and "val loss start" in log
    assert f"outputs: {run_dir}" in log
    assert "train: 100%" in log and log.count("train: ") <= 2  # the progress bar once, in its last state


# 9. where.py on raw JSONL runs -------------------------------------------------------------------------------

@pytest.mark.parametrize("with_data_json", [True, False])
def test_where_on_a_raw_jsonl_run(finished_run, tmp_path, with_data_json):
    src, _ = finished_run
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir)
    if not with_data_json:  # a run from before data.json: samples.parquet's file:line answers
        (run_dir / "data.json").unlink(missing_ok=True)
    sample = pd.read_parquet(run_dir / "samples.parquet").iloc[0]
    proc = run([PY, str(ROOT / "launch" / "where.py"), str(run_dir), str(sample.sample_id), "--json"])
    info = json.loads(proc.stdout)
    assert info["domain"] == sample.domain and info["doc_id"] == sample.doc_id
    source = Path(info["source"]) if Path(info["source"]).is_absolute() else ROOT / info["source"]
    line = source.read_text().splitlines()[info["line"] - 1]
    assert json.loads(line)["text"]
    assert "Transformer Engine" not in proc.stderr


# 10. comparison.png ------------------------------------------------------------------------------------------

def test_comparison_plot_is_readable():
    from dataflex.report import comparison as compare

    domains = ["prose", "code", "math", "noise"]
    history = [{"step": s, "domain_weights": {d: 0.25 for d in domains}} for s in range(40)]
    runs = [{"name": name, "history": history,
             "summary": {"val_loss": {d: 5.0 + 0.07 * i + 0.01 * k for k, d in enumerate(domains)},
                         "domain_weights": {d: 0.25 for d in domains}}}
            for i, name in enumerate(["mixer=static", "mixer=static,weights=size"])]
    fig = compare.figure(runs)
    *bar_axes, weights = fig.axes
    assert [ax.get_title() for ax in bar_axes] == domains
    for k, ax in enumerate(bar_axes):  # one zoomed panel per domain: a 0.07 difference fills it
        low, high = ax.get_ylim()
        assert low > 4.5 and high - low < 0.5
        assert {t.get_text() for t in ax.texts} == {f"{5.0 + 0.01 * k:.3f}", f"{5.07 + 0.01 * k:.3f}"}  # values on bars
    fig.canvas.draw()
    plot_box = weights.get_window_extent()
    for legend in [a for a in weights.get_children() if a.__class__.__name__ == "Legend"]:
        assert not legend.get_window_extent().overlaps(plot_box)  # legends outside the curves
    lines = {}
    for line in weights.get_lines():
        lines.setdefault(line.get_color(), []).append(line)
    for same_domain in lines.values():  # identical curves of two runs: different style, marker and width
        a, b = same_domain
        assert (a.get_linestyle(), a.get_marker(), a.get_linewidth()) != (b.get_linestyle(), b.get_marker(), b.get_linewidth())
        assert a.get_markevery() != b.get_markevery()


# 11. .txt.gz ---------------------------------------------------------------------------------------------------

def test_gzipped_plain_text_is_decompressed(tmp_path, monkeypatch):
    from dataflex.data.domains import load_domains
    from dataprep.readers import expand_entry, read_source

    text = "First paragraph of a gzipped book, long enough to count.\n\nSecond paragraph, also plain text.\n"
    path = tmp_path / "book.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(text * 20)
    (src,) = expand_entry(str(path), "data.domains.books.train")
    assert src.fmt == "text"
    records = list(read_source(src))
    assert records[0].text == "First paragraph of a gzipped book, long enough to count.\n" and records[1].line == 3
    monkeypatch.setenv("DATAFLEX_CACHE", str(tmp_path / "cache"))
    domains = load_domains({"domains": {"books": {"train": str(path)}}, "tokenizer": str(ROOT / "data/default/tokenizer.json")},
                           seq_len=32)
    assert len(domains.train["books"]) >= 40
