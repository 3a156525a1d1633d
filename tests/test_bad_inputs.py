"""Issue 11: a catalogue of bad inputs, each with the error it gets and its message. Most are checked
in-process (the same functions launch/train.py calls before any step, whose errors it prints as
`train: error: ...` with exit 2); a few launches show the exit code and that no traceback is shown.
The table of docs/guides/troubleshooting.md lists the same cases."""
import json
import os
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf
from test_launch import ROOT, run

from dataflex.backends.extensions import clear_stale_extension_locks
from dataflex.data.domains import load_domains
from dataflex.data.tokenizer import load_tokenizer_checked
from dataflex.run.checkpoints import mark_complete, resolve_resume
from dataflex.run.config import check_config, check_known_keys
from dataflex.utils.errors import (
    ConfigError,
    DataConfigError,
    RunError,
    ShardError,
    UserError,
)
from dataprep.readers import Source, read_source

TOKENIZER = str(ROOT / "data" / "default" / "tokenizer.json")
GOOD = "".join(json.dumps({"text": f"document number {i} has a few words in it."}) + "\n" for i in range(20))


def trainer(**over):
    base = OmegaConf.load(ROOT / "configs" / "trainer" / "default.yaml")
    return OmegaConf.create({"trainer": {**OmegaConf.to_container(base), **over},
                             "model": {"seq_len": 64, "vocab_size": None, "d_model": 32},
                             "backend": {"name": "deepspeed", "zero_stage": 0, "bf16": False}})


# --------------------------------------------------------------------- config values (before any data)

CONFIG_CASES = [
    ({"max_steps": -5}, "trainer.max_steps=-5: expected an integer > 0"),
    ({"max_steps": 0}, "trainer.max_steps=0: expected an integer > 0"),
    ({"max_steps": "abc"}, "trainer.max_steps='abc': expected an integer > 0"),
    ({"checkpoint_every": -1}, "trainer.checkpoint_every=-1: expected an integer >= 0"),
    ({"lr": -0.1}, "trainer.lr=-0.1: expected a number > 0"),
    ({"lr": "fast"}, "trainer.lr='fast': expected a number > 0"),
    ({"global_batch_size": 0}, "trainer.global_batch_size=0: expected an integer > 0"),
    ({"eval_every": 0}, "trainer.eval_every=0: expected an integer > 0"),
    ({"seed": 1.5}, "trainer.seed=1.5: expected an integer"),
    ({"nonfinite": "ignore"}, "trainer.nonfinite='ignore': expected drop, stop or skip"),
    ({"loss_reduction": "mean"}, "trainer.loss_reduction='mean': expected token or sample"),
    ({"plot": "yes"}, "trainer.plot='yes': expected true or false"),
    ({"warmup_steps": -1}, "trainer.warmup_steps=-1: expected an integer >= 0"),
    ({"global_batch_size": 3, "nprocs": 2}, "trainer.global_batch_size=3: must divide by trainer.nprocs=2"),
]


@pytest.mark.parametrize("over,message", CONFIG_CASES, ids=[m.split(":")[0] + str(i) for i, (_, m) in
                                                            enumerate(CONFIG_CASES)])
def test_bad_trainer_value(over, message):
    with pytest.raises(ConfigError) as e:
        check_config(trainer(**over))
    assert message in str(e.value)
    assert isinstance(e.value, UserError)      # launch/train.py: `train: error: ...`, exit 2


def test_bad_backend_and_model_values():
    cfg = trainer()
    cfg.backend.zero_stage = 4
    with pytest.raises(ConfigError, match=r"backend.zero_stage=4: expected 0, 1, 2 or 3"):
        check_config(cfg)
    cfg = trainer()
    cfg.model.seq_len = 1
    with pytest.raises(ConfigError, match=r"model.seq_len=1: expected an integer > 1"):
        check_config(cfg)


def test_defaults_pass():
    check_config(trainer())


def test_unknown_trainer_key_names_the_closest():
    cfg = OmegaConf.create({"trainer": {"max_step": 10}})
    with pytest.raises(RunError, match=r"trainer.max_step: unknown trainer setting \(did you mean trainer.max_steps"):
        check_known_keys(cfg, "trainer", {"max_steps": 1, "lr": 1})


# ------------------------------------------------------------------------------------- data inputs

def load(tmp_path, domains, **extra):
    cfg = {"domains": domains, "tokenizer": TOKENIZER, "cache": str(tmp_path / "cache"), **extra}
    return load_domains(cfg, seq_len=16, max_val_samples=4, progress=False)


def good_file(tmp_path, name="good.jsonl"):
    p = tmp_path / name
    p.write_text(GOOD)
    return str(p)


def test_binary_file_with_nul_bytes(tmp_path):
    lib = tmp_path / "libc.so.txt"
    lib.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    with pytest.raises(DataConfigError) as e:
        load(tmp_path, {"good": {"train": good_file(tmp_path)}, "bin": {"train": str(lib)}})
    assert f"{lib}: binary file (NUL bytes in its first KB)" in str(e.value)
    assert "data.domains.bin.train" in str(e.value)


def test_binary_file_mostly_undecodable(tmp_path):
    blob = tmp_path / "image.jsonl"
    blob.write_bytes(bytes([0x80 + (i * 7) % 120 for i in range(4000)]))
    with pytest.raises(DataConfigError, match="binary file .* bytes are not UTF-8"):
        load(tmp_path, {"blob": {"train": str(blob)}})


def test_binary_file_inside_a_folder(tmp_path):
    folder = tmp_path / "web"
    folder.mkdir()
    (folder / "a.jsonl").write_text(GOOD)
    (folder / "core").write_bytes(b"\0" * 2000)
    with pytest.raises(DataConfigError, match=f"{folder / 'core'}: binary file"):
        load(tmp_path, {"web": {"train": str(folder)}})


def test_non_utf8_line_in_text_file(tmp_path):
    txt = tmp_path / "prose.txt"
    txt.write_bytes(b"first paragraph, fine.\n\nsecond paragraph\nwith a bad byte \xff here\n")
    with pytest.raises(DataConfigError, match=rf"{txt}:4: not valid UTF-8"):
        load(tmp_path, {"prose": {"train": str(txt)}})


def test_non_utf8_line_in_jsonl(tmp_path):
    bad = tmp_path / "web.jsonl"
    bad.write_bytes(GOOD.encode() + b'{"text": "caf\xe9 latin-1"}\n')
    with pytest.raises(DataConfigError, match=rf"{bad}:21: not valid UTF-8"):
        load(tmp_path, {"web": {"train": str(bad)}})


def test_dataprep_quarantines_non_utf8_text(tmp_path):
    """dataprep's readers give the block a bad_utf8 record (rejected, as JSONL records are), not U+FFFD."""
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"good block\n\nbad \xfe block\n")
    records = list(read_source(Source(str(txt), "text")))
    assert records[0].text == "good block\n" and records[1].reason == "bad_utf8" and records[1].line == 3


def test_malformed_json_line(tmp_path):
    bad = tmp_path / "web.jsonl"
    bad.write_text(GOOD + '{"text": "unterminated\n')
    with pytest.raises(DataConfigError, match=rf"{bad}:21: malformed JSON"):
        load(tmp_path, {"web": {"train": str(bad)}})


def test_record_without_text(tmp_path):
    bad = tmp_path / "web.jsonl"
    bad.write_text(GOOD + '{"body": "no text"}\n')
    with pytest.raises(DataConfigError, match=rf"{bad}:21: record has no string 'text' field"):
        load(tmp_path, {"web": {"train": str(bad)}})


def test_missing_input(tmp_path):
    with pytest.raises(DataConfigError, match=r"data.domains.web.train: input not found: '/no/such.jsonl'"):
        load(tmp_path, {"web": {"train": "/no/such.jsonl"}})


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataConfigError, match=r"data.domains.web.train: no input matches the pattern"):
        load(tmp_path, {"web": {"train": str(tmp_path / "*.jsonl")}})


def test_empty_domain(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataConfigError, match=r"data.domains.web.train: no documents"):
        load(tmp_path, {"web": {"train": str(empty)}})


def test_same_file_in_two_domains(tmp_path):
    path = good_file(tmp_path)
    with pytest.raises(DataConfigError) as e:
        load(tmp_path, {"a": {"train": path}, "b": {"train": [str(tmp_path / "*.jsonl")]}})
    assert f"{path}: in two domains (data.domains.a.train and data.domains.b.train)" in str(e.value)


def test_domain_without_train(tmp_path):
    with pytest.raises(DataConfigError, match=r"data.domains.web.train: missing"):
        load(tmp_path, {"web": {"val": good_file(tmp_path)}})


def test_unknown_data_key(tmp_path):
    with pytest.raises(DataConfigError, match=r"data: unknown key\(s\) \['tokeniser'\]"):
        load(tmp_path, {"web": {"train": good_file(tmp_path)}}, tokeniser="x")


def test_missing_tokenizer(tmp_path):
    with pytest.raises(ConfigError, match=r"data.tokenizer: tokenizer not found: '/no/tok.json'"):
        load_tokenizer_checked("/no/tok.json")


def test_wrong_tokenizer_file(tmp_path):
    tok = tmp_path / "tok.json"
    tok.write_text('{"not": "a tokenizer"}')
    with pytest.raises(ConfigError, match=rf"data.tokenizer: {tok} is not a readable tokenizer"):
        load_tokenizer_checked(str(tok))


# ---------------------------------------------------------------------------------------- shards

@pytest.fixture
def cached(tmp_path):
    """A built data cache (one domain) and the path of its one .bin shard."""
    domains = {"web": {"train": good_file(tmp_path)}}
    load(tmp_path, domains)
    (shard,) = (tmp_path / "cache").rglob("*.bin")
    return domains, shard


def test_shard_bytes_overwritten(tmp_path, cached):
    domains, shard = cached
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    time.sleep(0.01)
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"shard {shard}: its sha256 .* differs from the recorded"):
        load(tmp_path, domains)


def test_shard_truncated(tmp_path, cached):
    domains, shard = cached
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(ShardError, match=rf"shard {shard}: .*\({size // 2} bytes now\).*changed or truncated"):
        load(tmp_path, domains)


def test_shard_missing(tmp_path, cached):
    domains, shard = cached
    shard.with_suffix(".idx").unlink()
    with pytest.raises(ShardError, match=rf"shard {shard.with_suffix('.idx')}: missing"):
        load(tmp_path, domains)


def test_shard_hash_is_checked_once(tmp_path, cached):
    domains, shard = cached
    memo = json.loads((shard.parent / ".verified.json").read_text())
    assert list(memo.values()) == [json.loads(next((tmp_path / "cache").rglob(".done.json")).read_text())
                                   ["shards"][0]["bin"]["sha256"]]


# ------------------------------------------------------------------------------------ checkpoints

def make_ckpt(run_dir, step, complete=True):
    path = run_dir / "checkpoints" / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "state.pt").write_bytes(b"x")
    if complete:
        mark_complete(path, step)
    return path


def test_resume_path_missing(tmp_path):
    with pytest.raises(RunError, match=r"trainer.resume: no checkpoint folder /no/run/checkpoints/step_0000002"):
        resolve_resume("/no/run/checkpoints/step_0000002", tmp_path)


def test_resume_incomplete_checkpoint_names_the_last_good(tmp_path):
    good = make_ckpt(tmp_path, 2)
    bad = make_ckpt(tmp_path, 4, complete=False)
    with pytest.raises(UserError) as e:
        resolve_resume(str(bad), tmp_path)
    assert f"checkpoint {bad} is incomplete" in str(e.value) and f"trainer.resume={good}" in str(e.value)


def test_resume_latest_skips_incomplete(tmp_path, capsys):
    good = make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 4, complete=False)
    (tmp_path / "checkpoints" / "step_0000006.tmp").mkdir()
    assert resolve_resume("latest", tmp_path) == good
    assert resolve_resume(True, tmp_path) == good
    assert "skipping the incomplete checkpoint" in capsys.readouterr().err


def test_resume_latest_without_complete_checkpoint(tmp_path):
    make_ckpt(tmp_path, 2, complete=False)
    with pytest.raises(RunError, match=r"no complete checkpoint under .* \(1 incomplete"):
        resolve_resume("latest", tmp_path)


def test_resume_latest_without_checkpoints(tmp_path):
    with pytest.raises(RunError, match=r"no complete checkpoint under"):
        resolve_resume("true", tmp_path)


# ------------------------------------------------------------------------- stale extension lock

def test_stale_torch_extension_lock_is_removed(tmp_path, capsys):
    build = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    build.mkdir(parents=True)
    lock = build / "lock"
    lock.write_text("")
    assert clear_stale_extension_locks(roots=[str(tmp_path)]) == []        # fresh: maybe compiling now
    old = time.time() - 3600
    os.utime(lock, (old, old))
    assert clear_stale_extension_locks(roots=[str(tmp_path)]) == [str(lock)]
    assert not lock.exists()
    assert "removed a stale torch extension lock" in capsys.readouterr().err


def test_extension_lock_of_a_live_build_is_kept(tmp_path):
    build = tmp_path / "ext"
    build.mkdir()
    (build / "lock").write_text("")
    old = time.time() - 3600
    os.utime(build / "lock", (old, old))
    proc = subprocess.Popen(["sleep", "30"], cwd=build)     # a compiler working in that folder
    try:
        time.sleep(0.2)
        assert clear_stale_extension_locks(roots=[str(tmp_path)], quiet=True) == []
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------ through the launcher

PY, TRAIN = sys.executable, str(ROOT / "launch" / "train.py")


BUGGY_MIXER = """
from dataflex.utils.errors import ConfigError
from dataflex.events import Event
from dataflex.mixers import StaticMixer


class Buggy(StaticMixer):
    def apply(self, event, state):
        super().apply(event, state)
        if event == Event.BATCH_END:
            if {kind!r} == "bug":
                {{}}["a key dataflex forgot"]           # a dataflex bug mid-training
            raise ConfigError("mixer.weights: the user's to fix")
"""


@pytest.mark.parametrize("kind", ["bug", "user"])
def test_a_dataflex_bug_is_not_a_user_error(tmp_path, monkeypatch, kind):
    """The same failure point mid-training: a KeyError (a bug of dataflex's) ends the run with its
    traceback and exit status 1, never as `train: error:` with status 2, which only a UserError gets."""
    (tmp_path / "buggy_plugin.py").write_text(BUGGY_MIXER.format(kind=kind))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    proc = run([PY, TRAIN, "backend=torch", "logger=none", "+mixer=static", "mixer._target_=buggy_plugin.Buggy",
                "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    if kind == "bug":
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert "Traceback" in proc.stderr and "KeyError: 'a key dataflex forgot'" in proc.stderr
        assert "train: error:" not in proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "train: error: mixer.weights: the user's to fix" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=abc", "train: error: trainer.max_steps='abc': expected an integer > 0"),
    ("trainer.resume=/no/such/run", "train: error: trainer.resume: no checkpoint folder /no/such/run"),
    ("data.tokenizer=/no/tok.json", "train: error: data.tokenizer: tokenizer not found: '/no/tok.json'"),
    ("model.vocab_size=100", "train: error: model.vocab_size=100 is smaller than the tokenizer's vocabulary (2048"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, override, message):
    proc = run([PY, TRAIN, "backend=torch", "logger=none", override, f"hydra.run.dir={tmp_path / 'run'}"],
               check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def test_binary_input_exits_2_naming_the_file(tmp_path):
    lib = tmp_path / "libc.so"
    lib.write_bytes(b"\x7fELF\x02\x01\x01\x00" * 300)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text(
        f"domains:\n  good: {{train: {good_file(tmp_path)}}}\n  bad: {{train: {lib}}}\n"
        f"tokenizer: {TOKENIZER}\ncache: {tmp_path / 'cache'}\n")
    proc = run([PY, TRAIN, "backend=torch", "logger=none", "--config-dir", str(tmp_path), "data=mine",
                f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train: error: {lib}: binary file (NUL bytes in its first KB)" in proc.stderr
    assert "Traceback" not in proc.stderr
