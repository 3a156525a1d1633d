"""Issue 20, the rest of "every bad input answered": each case ends with one `train: error:` / `prep: error:`
line and exit 2 (no traceback), leaving the user's files as they were. The rows of
docs/guides/troubleshooting.md's table name the same cases."""
import hashlib
import sys
import time
from pathlib import Path

import pytest
from test_launch import ROOT, run

from dataflex.run.yaml_files import YAML_ALIAS_LIMIT, named_yaml_files, yaml_alias_uses

PY, TRAIN, PREP = sys.executable, str(ROOT / "launch" / "train.py"), str(ROOT / "launch" / "prep.py")
TOKENIZER = str(ROOT / "data" / "default" / "tokenizer.json")


def digest(folder: Path) -> dict:
    """Every file under folder with its sha256: "files untouched" is this, before and after."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------- YAML alias bomb

def bomb(levels: int = 7) -> str:
    """About 300 bytes whose aliases expand to 9**levels items (the issue's 41 s and 0.5 GB at 7)."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_uses_are_counted_without_expanding():
    text = bomb(30)                     # 9**30 items if expanded: counted at once
    started = time.time()
    assert yaml_alias_uses(text) == YAML_ALIAS_LIMIT + 1
    assert time.time() - started < 1
    assert yaml_alias_uses("base: &b {lr: 1, wd: 0}\nx: *b\ny: {<<: *b, lr: 2}\n") == 2
    assert yaml_alias_uses("a: &a [1, *a]\n") == YAML_ALIAS_LIMIT + 1       # recursive
    assert yaml_alias_uses("a: 1\n") == 0


def test_every_shipped_config_is_far_below_the_bound():
    for path in (ROOT / "configs").rglob("*.yaml"):
        assert yaml_alias_uses(path.read_text()) < 100, path


def test_the_files_a_command_line_names(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bomb.yaml").write_text("a: 1\n")
    files = named_yaml_files(["--config-dir", str(tmp_path), "data=bomb", "+mixer=static,bandit", "trainer.lr=1"],
                             str(ROOT / "configs"), "train")
    assert str(tmp_path / "data" / "bomb.yaml") in files
    assert str(ROOT / "configs" / "mixer" / "bandit.yaml") in files
    assert str(ROOT / "configs" / "train.yaml") in files and str(ROOT / "configs" / "model" / "tiny.yaml") in files


@pytest.mark.parametrize("prog", ["train", "prep"])
def test_alias_bomb_in_a_data_config_is_refused_at_once(tmp_path, prog):
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "bomb.yaml"
    path.write_text(bomb() + f"tokenizer: {TOKENIZER}\ndomains:\n  a: {{train: {tmp_path / 'a.jsonl'}}}\n")
    assert len(bomb()) < 400
    before = digest(tmp_path)
    where = (f"hydra.run.dir={tmp_path / 'run'}" if prog == "train" else f"prep.output_dir={tmp_path / 'out'}")
    started = time.time()
    proc = run([PY, TRAIN if prog == "train" else PREP, "--config-dir", str(tmp_path), "data=bomb", where]
               + (["backend=torch", "logger=none"] if prog == "train" else []), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{prog}: error: {path}: more than {YAML_ALIAS_LIMIT:,} YAML aliases (an alias bomb?)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.time() - started < 60           # the import of torch, not the bomb (41 s before)
    assert digest(tmp_path) == before            # nothing written: no run folder, no output folder


# ------------------------------------------------------------- tracebacks where a message belongs

GOOD_LINES = "".join('{"text": "document %d has a few words in it."}\n' % i for i in range(50))


def bad_inputs(tmp_path: Path) -> dict:
    """case -> (data config text, the start of the message after `train: error: `)."""
    import gzip
    import os

    import pandas as pd

    (tmp_path / "good.jsonl").write_text(GOOD_LINES)
    pd.DataFrame({"body": ["hello world"] * 5}).to_parquet(tmp_path / "notext.parquet")
    packed = gzip.compress(GOOD_LINES.encode() * 40)
    (tmp_path / "cut.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    os.symlink(tmp_path / "loopb", tmp_path / "loopa")
    os.symlink(tmp_path / "loopa", tmp_path / "loopb")

    def config(bad: str) -> str:
        return (f"tokenizer: {TOKENIZER}\ncache: {tmp_path / 'cache'}\ndomains:\n  good: {{train: {tmp_path / 'good.jsonl'}}}\n"
                f"  bad: {{train: '{bad}'}}\n")

    return {
        "parquet": (config(tmp_path / "notext.parquet"),
                    f"{tmp_path / 'notext.parquet'}: Parquet file has no column 'text'"),
        "gz": (config(tmp_path / "cut.jsonl.gz"),
               f"{tmp_path / 'cut.jsonl.gz'}: compressed file is truncated or damaged"),
        "loop": (config(tmp_path / "loopa"),
                 f"data.domains.bad.train: '{tmp_path / 'loopa'}' is a symbolic link that leads nowhere (a link loop"),
        "list": ("- good.jsonl\n- other.jsonl\n", "data: the data config ("),
        "interp": (config("${nosuch.key}"),
                   "data.domains.bad.train: Interpolation key 'nosuch.key' not found: an interpolation ${...} there "
                   "names a key the config does not have"),
    }


@pytest.mark.parametrize("case", ["parquet", "gz", "loop", "list", "interp"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    text, message = bad_inputs(tmp_path)[case]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.yaml").write_text(text)
    inputs = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    proc = run([PY, TRAIN, "backend=torch", "logger=none", "--config-dir", str(tmp_path), "data=bad",
                "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train: error: {message}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "full_key" not in proc.stderr
    assert {p: p.read_bytes() for p in inputs} == inputs            # the user's files untouched
    assert not (tmp_path / "run").exists()                          # no run folder left behind


def test_config_that_is_not_yaml_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.yaml").write_text("domains:\n  a: {train: ${x}}\n")
    before = digest(tmp_path)
    proc = run([PY, TRAIN, "backend=torch", "logger=none", "--config-dir", str(tmp_path), "data=bad",
                f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train: error: {tmp_path / 'data' / 'bad.yaml'}:2:" in proc.stderr and "not valid YAML" in proc.stderr
    assert "Traceback" not in proc.stderr and digest(tmp_path) == before


@pytest.mark.parametrize("case", ["tokenizer", "interp"])
def test_prep_bad_input_is_one_line_and_exit_2(tmp_path, case):
    (tmp_path / "good.jsonl").write_text(GOOD_LINES)
    (tmp_path / "tok.json").write_text('{"model": {"type": "BPE", "vocab": ')     # cut short
    (tmp_path / "data").mkdir()
    tok, train = (tmp_path / "tok.json", tmp_path / "good.jsonl") if case == "tokenizer" else (TOKENIZER, "${nosuch}")
    (tmp_path / "data" / "bad.yaml").write_text(f"tokenizer: {tok}\ndomains:\n  good:\n    train: {train}\n")
    before = digest(tmp_path)
    proc = run([PY, PREP, "--config-dir", str(tmp_path), "data=bad", f"prep.output_dir={tmp_path / 'out'}"],
               check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = (f"data.tokenizer: {tmp_path / 'tok.json'} is not a readable tokenizer (" if case == "tokenizer" else
               "prep: error: data.domains.good.train: Interpolation key 'nosuch' not found")
    assert message in proc.stderr and "Traceback" not in proc.stderr and "full_key" not in proc.stderr
    assert all(digest(tmp_path).get(k) == v for k, v in before.items())       # the user's files untouched
    assert not (tmp_path / "out" / "shards").exists()


# ------------------------------------------------------------------ a plugin's target, before step 0

FAST = ["backend=torch", "logger=none", "model.d_model=32", "model.seq_len=64", "trainer.global_batch_size=4",
        "trainer.max_val_samples=8"]


@pytest.mark.parametrize("overrides,message", [
    (["+selector=less", "selector.target=cod", "trainer.max_steps=1"],      # the run ends inside LESS's warm-up
     "train: error: selector.target=cod: the data config has no target set and no domain named 'cod' (domains: "
     "prose, code, math, noise; did you mean 'code'?)"),
    (["+selector=tracin", "trainer.max_steps=1"],
     "train: error: selector.target=target: the data config has no target set (`target: {val: PATH}`"),
    (["+reweighter=anchor", "reweighter.anchor=cod", "trainer.max_steps=1"],
     "train: error: reweighter.anchor=cod: the data config has no target set and no domain named 'cod'"),
    (["+reweighter=rho1", "reweighter.reference=REF", "reweighter.burnout_steps=5", "trainer.max_steps=1"],
     "train: error: reweighter.reference=REF: no checkpoint under REF"),
    (["+mixer=sheared", "mixer.reference=null", "trainer.max_steps=1"],      # its constructor's ValueError
     "train: error: mixer: sheared needs exactly one of reference_loss ({domain: loss}) or reference (RUN_DIR)"),
], ids=["less-warmup", "tracin", "anchor", "rho1-reference", "sheared-constructor"])
def test_a_plugins_target_is_checked_before_the_first_step(tmp_path, overrides, message):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "train.log").write_text("an earlier run without checkpoints\n")
    before = digest(tmp_path)
    overrides = [o.replace("REF", str(ref)) for o in overrides]
    proc = run([PY, TRAIN, *FAST, *overrides, f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message.replace("REF", str(ref)) in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists() and digest(tmp_path) == before


# ---------------------------------------------------------- a failed run's folder; what a resume says

USER_ERROR_MIXER = """
from dataflex.events import Event
from dataflex.mixers import StaticMixer
from dataflex.utils.errors import ConfigError


class FailsAtStep2(StaticMixer):
    def apply(self, event, state):
        super().apply(event, state)
        if event == Event.BATCH_END and state.step >= 2:
            raise ConfigError("mixer.weights: the user's to fix")
"""


def test_a_failed_runs_folder_does_not_block_its_retry(tmp_path, monkeypatch):
    import os

    (tmp_path / "failing.py").write_text(USER_ERROR_MIXER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    run_dir = tmp_path / "run"
    args = [PY, TRAIN, *FAST, "trainer.max_steps=4", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"]
    proc = run(args + ["+mixer=static", "mixer._target_=failing.FailsAtStep2"], check=False, timeout=300)
    assert proc.returncode == 2 and "train: error: mixer.weights: the user's to fix" in proc.stderr, proc.stderr[-2000:]
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / ".failed").is_file()    # its traces, marked
    proc = run(args + ["+mixer=static"], check=False, timeout=300)                         # the retry, fixed
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"note: {run_dir} holds only a failed run's outputs" in proc.stderr
    assert (run_dir / "summary.json").is_file() and not (run_dir / ".failed").exists()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"train_loss"' in x for x in lines) == 4          # the retry's steps only, not appended


def test_a_killed_or_finished_run_still_holds_its_folder(tmp_path):
    from dataflex.run.checkpoints import mark_complete
    from dataflex.run.launching import mark_failed_run, prepare_run_dir
    from dataflex.utils.errors import RunError

    killed = tmp_path / "killed"          # kill -9: no mark, so the folder is the user's to judge
    killed.mkdir()
    (killed / "metrics.jsonl").write_text('{"step": 0}\n')
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "metrics.jsonl").write_text('{"step": 0}\n')
    (finished / "summary.json").write_text("{}")
    mark_failed_run(finished)             # a summary: never marked
    resumable = tmp_path / "resumable"
    (resumable / "checkpoints" / "step_0000002").mkdir(parents=True)
    mark_complete(resumable / "checkpoints" / "step_0000002", 2)
    (resumable / "metrics.jsonl").write_text('{"step": 0}\n')
    mark_failed_run(resumable)            # a complete checkpoint: continue it, never reuse it
    for folder in (killed, finished, resumable):
        before = digest(folder)
        with pytest.raises(RunError, match="already holds a run"):
            prepare_run_dir(folder, None, False)
        assert digest(folder) == before


def test_a_resume_says_what_it_resumed(tmp_path):
    run_dir = tmp_path / "run"
    args = [PY, TRAIN, *FAST, "trainer.checkpoint_every=2", "trainer.eval_every=2", f"hydra.run.dir={run_dir}"]
    run(args + ["trainer.max_steps=2"], timeout=300)
    proc = run(args + ["trainer.max_steps=4", "trainer.resume=latest"], timeout=300)
    ckpt = (run_dir / "checkpoints" / "step_0000002").resolve()
    assert f"resumed from step 2 (checkpoint {ckpt})" in proc.stdout


# --------------------------------------------------------------------------------------- disk full

NO_SPACE_AT_STEP_4 = """
import errno, runpy, sys, torch
real = torch.save
def save(obj, f, *a, **k):
    if "step_0000004" in str(f):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))
    return real(obj, f, *a, **k)
torch.save = save
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_disk_full_at_a_checkpoint_names_disk_and_path(tmp_path):
    run_dir = tmp_path / "run"
    proc = run([PY, "-c", NO_SPACE_AT_STEP_4, TRAIN, *FAST, "trainer.max_steps=6", "trainer.checkpoint_every=2",
                "trainer.eval_every=2", f"hydra.run.dir={run_dir}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("train: error:"))
    assert line.startswith(f"train: error: disk full: no space left to write {run_dir / 'checkpoints'}"
                           f"/step_0000004.tmp/state.pt.tmp (the disk mounted at /"), line
    assert "while saving checkpoint step_0000004" in line and "trainer.resume=latest" in line
    assert "Traceback" not in proc.stderr
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000002"]                    # the earlier one intact, no .tmp debris
    assert not (run_dir / ".failed").exists()           # resumable: never reused as a failed run's folder
    proc = run([PY, TRAIN, *FAST, "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=2",
                f"hydra.run.dir={run_dir}", "trainer.resume=latest"], timeout=300)
    assert "resumed from step 2" in proc.stdout


def test_disk_full_in_the_data_cache_names_disk_and_path(tmp_path, monkeypatch):
    import errno

    import dataflex.data.domains as domains
    from dataflex.utils.errors import DataConfigError

    target = tmp_path / "cache" / "abc" / "good" / "train" / "shards" / "good_train_00000.bin.tmp"

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(domains, "ensure_cache", no_space)
    (tmp_path / "good.jsonl").write_text(GOOD_LINES)
    before = digest(tmp_path)
    data = {"tokenizer": TOKENIZER, "cache": str(tmp_path / "cache"), "domains": {"good": {"train": str(tmp_path / "good.jsonl")}}}
    with pytest.raises(DataConfigError) as e:
        domains.load_domains(data, 64)
    assert str(e.value).startswith(f"disk full: no space left to write {target} (the disk mounted at /")
    assert "while building the data cache" in str(e.value) and "data.cache=DIR" in str(e.value)
    assert digest(tmp_path) == before


# ------------------------------------------------------------------------- W&B: one run across a resume

def test_a_resume_continues_the_same_wandb_run(tmp_path):
    """WANDB_MODE=offline (test_launch.run sets it): the id is kept in the checkpoint's completion marker and
    the resumed training opens the same W&B run, so the dashboard shows every step in one run."""
    import json

    run_dir = tmp_path / "run"
    args = [PY, TRAIN, *[a for a in FAST if a != "logger=none"], "logger=wandb", "trainer.checkpoint_every=2",
            "trainer.eval_every=2", f"hydra.run.dir={run_dir}"]
    run(args + ["trainer.max_steps=2"], timeout=300)
    from dataflex.run.checkpoints import COMPLETE

    wandb_id = json.loads((run_dir / "checkpoints" / "step_0000002" / COMPLETE).read_text())["wandb_id"]
    run(args + ["trainer.max_steps=4", "trainer.resume=latest"], timeout=300)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{wandb_id}") for name in runs), runs


# ----------------------------------------------------------- a first DeepSpeed start says what it compiles

def test_an_op_build_is_announced_before_it_starts(tmp_path, monkeypatch, capsys):
    """No build of DeepSpeed's CPU comm op under TORCH_EXTENSIONS_DIR: one line names the op, the time and
    the folder before the (silent) compile; once the build is there, nothing is printed."""
    import deepspeed  # noqa: F401
    from dataflex.backends.extensions import announce_op_builds, optimizer_builders

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert announce_op_builds(["ShareMemCommBuilder"]) == ["deepspeed_shm_comm"]
    err = capsys.readouterr().err
    assert err == (f"dataflex: building DeepSpeed's deepspeed_shm_comm op (first run only, ~1 min; cached in "
                   f"{tmp_path / 'deepspeed_shm_comm'}) ...\n")
    monkeypatch.setenv("LOCAL_RANK", "1")                 # one line per machine: local rank 0 says it
    assert announce_op_builds(["ShareMemCommBuilder"]) == ["deepspeed_shm_comm"]
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("LOCAL_RANK")
    (tmp_path / "deepspeed_shm_comm").mkdir()
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")   # where torch puts the build
    assert announce_op_builds(["ShareMemCommBuilder"]) == [] and capsys.readouterr().err == ""
    # a DeepSpeed JSON's optimizer: offloaded Adam compiles cpu_adam; dataflex's own AdamW compiles nothing
    assert optimizer_builders({"optimizer": {"type": "AdamW"}, "zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}) == ["CPUAdamBuilder"]
    assert optimizer_builders({"zero_optimization": {"stage": 2}}) == []


@pytest.mark.slow
def test_a_first_deepspeed_start_says_it_compiles(tmp_path):
    """A real first start (an empty TORCH_EXTENSIONS_DIR): the line comes before the build, and the build lands
    in the folder the line names (the same rule as torch's)."""
    import deepspeed  # noqa: F401
    import os

    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    proc = subprocess_run([PY, TRAIN, "backend=deepspeed", *FAST[1:], "trainer.max_steps=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "ext" / "deepspeed_shm_comm"
    line = f"dataflex: building DeepSpeed's deepspeed_shm_comm op (first run only, ~1 min; cached in {folder}) ..."
    assert line in proc.stderr
    assert (folder / "deepspeed_shm_comm.so").is_file()


def subprocess_run(args, env):
    import subprocess

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(WANDB_MODE="offline", DS_ACCELERATOR="cpu", HYDRA_FULL_ERROR="0")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
