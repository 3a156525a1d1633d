"""Issue 20: safe with untrusted inputs. Names are names (a domain, split or subtask name never becomes a
path outside its folder), a manifest's shard paths stay in the manifest's folder, prep deletes only what
it wrote. Each case asserts the exit code or error, its message, and that a sentinel file outside is intact."""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from test_launch import ROOT, run

from dataflex.data.domains import load_domains
from dataflex.utils.errors import DataConfigError, ShardError, UserError
from dataprep.readers import InputError
from dataprep.run import prepare
from dataprep.safety import check_name

PY = sys.executable
TOKENIZER = str(ROOT / "data" / "default" / "tokenizer.json")
GOOD = "".join(json.dumps({"text": f"document number {i} has a few words in it, enough of them."}) + "\n"
               for i in range(30))
STEPS = [{"_target_": "dataprep.steps.normalize.Normalize"},
         {"_target_": "dataprep.steps.tokenize.Tokenize", "tokenizer": TOKENIZER}]


def sentinel(folder: Path) -> Path:
    """A file a traversal would delete or overwrite: `folder/train/sentinel.txt`, and `folder/shards/`."""
    (folder / "train").mkdir(parents=True, exist_ok=True)
    p = folder / "train" / "sentinel.txt"
    p.write_text("keep me")
    return p


def corpus(tmp_path: Path) -> str:
    p = tmp_path / "good.jsonl"
    p.write_text(GOOD)
    return str(p)


def listing(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------ the rule

@pytest.mark.parametrize("name", ["prose", "web-en", "code_2024", "v1.2", "c++", "_target"])
def test_plain_names_pass(name):
    assert check_name(name, "data.domains.x") == name


@pytest.mark.parametrize("name", ["/abs/dir", "../..", "..", ".", "a/b", "a\\b", ".hidden", "-x", "", "a..b",
                                  "x" * 129, "naïve", "a b", 5, None])
def test_path_like_names_are_refused(name):
    with pytest.raises(ValueError, match=r"data\.domains\.k: .*(not a valid name|not a string)"):
        check_name(name, "data.domains.k")


# ------------------------------------------------------------------------------ training: names

def write_data_config(tmp_path: Path, domains_yaml: str, extra: str = "") -> Path:
    cdir = tmp_path / "conf"
    (cdir / "data").mkdir(parents=True, exist_ok=True)
    (cdir / "data" / "mine.yaml").write_text(
        f"domains:\n{domains_yaml}tokenizer: {TOKENIZER}\ncache: {tmp_path / 'a' / 'b' / 'cache'}\n{extra}")
    return cdir


@pytest.mark.parametrize("kind", ["absolute", "dotdot"])
def test_train_refuses_a_path_as_domain_name(tmp_path, kind):
    """`/ABS/DIR` would delete ABS/DIR/train; `../..` would write two levels above the cache's key folder:
    both refused with exit 2 naming the key, before the cache, the run folder or the sentinel is touched."""
    good = corpus(tmp_path)
    outside = tmp_path / "victim" if kind == "absolute" else tmp_path / "a" / "b"
    keep = sentinel(outside)
    name = str(outside) if kind == "absolute" else "../.."
    cdir = write_data_config(tmp_path, f"  prose: {{train: {good}}}\n  '{name}': {{train: {good}}}\n")
    proc = run([PY, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "--config-dir", str(cdir),
                "data=mine", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train: error: data.domains.{name}: '{name}' is not a valid name" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert keep.read_text() == "keep me" and listing(outside) == ["train", "train/sentinel.txt"]
    assert not (tmp_path / "a" / "b" / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("domains,target,key", [
    ({"../..": "T"}, None, "data.domains.../.."),
    ({"/ABS": "T"}, None, "data.domains./ABS"),
    ({"prose": "T"}, {"../..": {"val": "T"}}, "data.target.../.."),
])
def test_load_domains_refuses_path_like_names(tmp_path, domains, target, key):
    """The data layer checks on its own (a caller that skips launch/train.py's early check)."""
    good = corpus(tmp_path)
    keep = sentinel(tmp_path / "a" / "b")
    cfg = {"domains": {k: {"train": good} for k in domains}, "tokenizer": TOKENIZER,
           "cache": str(tmp_path / "a" / "b" / "cache")}
    if target:
        cfg["target"] = {k: {"val": good} for k in target}
    with pytest.raises(DataConfigError, match=f"{key}: .* is not a valid name"):
        load_domains(cfg, seq_len=16, progress=False)
    assert keep.read_text() == "keep me" and not (tmp_path / "a" / "b" / "cache").exists()


# --------------------------------------------------------------------------------- prep: names

@pytest.mark.parametrize("kind", ["absolute", "dotdot", "split"])
def test_prep_refuses_a_path_as_name(tmp_path, kind):
    good = corpus(tmp_path)
    out = tmp_path / "prepared"
    outside = tmp_path / "victim"
    keep = sentinel(outside)
    name, key = {"absolute": (str(outside), f"data.domains.{outside}"), "dotdot": ("../..", "data.domains.../.."),
                 "split": ("../../victim", "data.domains.prose.../../victim")}[kind]
    domains = (f"  prose:\n    '{name}': {good}\n" if kind == "split" else
               f"  prose: {{train: {good}}}\n  '{name}': {{train: {good}}}\n")
    cdir = write_data_config(tmp_path, domains)
    proc = run([PY, str(ROOT / "launch" / "prep.py"), "--config-dir", str(cdir), "data=mine",
                f"prep.output_dir={out}", "prep.execution.workers=1", "prep.execution.progress=false"],
               check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prep: error: ") and f"{key}: '{name}' is not a valid name" in last, last
    assert "Traceback" not in proc.stderr
    assert keep.read_text() == "keep me" and listing(outside) == ["train", "train/sentinel.txt"]
    assert not (out / "shards").exists() and not (out / "manifest.json").exists()


# ------------------------------------------------------------------------ manifests: shard paths

def prep_cfg(out, **kw):
    return {"output_dir": str(out), "shard_size_mb": 64, "steps": STEPS,
            "execution": {"executor": "local", "workers": 1, "progress": False}, **kw}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    good = corpus(root)
    out = root / "out"
    prepare({"domains": {"prose": {"train": good, "val": good}}, "tokenizer": TOKENIZER}, prep_cfg(out))
    return out


def forged(tmp_path: Path, prepared: Path, how: str) -> tuple[Path, Path]:
    """A copy of a prepared folder whose manifest points at a copy of its shards placed outside it."""
    folder = tmp_path / "m"
    shutil.copytree(prepared, folder)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder / "shards", elsewhere)
    m = json.loads((folder / "manifest.json").read_text())
    sh = m["shards"][0]
    rel = os.path.relpath(sh["prefix"], "shards")
    if how == "dotdot":
        sh["prefix"] = os.path.join("..", "elsewhere", rel)
    elif how == "absolute":
        sh["prefix"] = str(elsewhere / rel)
    elif how == "symlink":       # the manifest is untouched; its shard folder is a link to another place
        shutil.rmtree(folder / "shards" / "prose")
        (folder / "shards" / "prose").symlink_to(elsewhere / "prose")
    elif how == "tokenizer":
        m["tokenizer"]["path"] = "../elsewhere/tokenizer.json"
        shutil.copy(folder / "tokenizer.json", elsewhere / "tokenizer.json")
    (folder / "manifest.json").write_text(json.dumps(m))
    return folder / "manifest.json", elsewhere


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink", "tokenizer"])
def test_manifest_paths_outside_its_folder_are_refused(tmp_path, prepared, how):
    """Followed, such a manifest was trained on and written beside (`.verified.json`, the sample index)."""
    manifest, elsewhere = forged(tmp_path, prepared, how)
    before = listing(elsewhere)
    with pytest.raises(ShardError, match=r"outside .*; refused|not a path relative to") as e:
        load_domains({"manifest": str(manifest)}, seq_len=16, progress=False)
    assert isinstance(e.value, UserError) and str(manifest) in str(e.value)
    assert listing(elsewhere) == before            # no .verified.json, no index written there


def test_manifest_traversal_through_the_launcher(tmp_path, prepared):
    manifest, elsewhere = forged(tmp_path, prepared, "dotdot")
    before = listing(elsewhere)
    cdir = tmp_path / "conf"
    (cdir / "data").mkdir(parents=True)
    (cdir / "data" / "m.yaml").write_text(f"manifest: {manifest}\n")
    proc = run([PY, str(ROOT / "launch" / "train.py"), "backend=torch", "logger=none", "--config-dir", str(cdir),
                "data=m", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}"], check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"train: error: {manifest}: shard '../elsewhere/" in proc.stderr and "outside" in proc.stderr
    assert "Traceback" not in proc.stderr and listing(elsewhere) == before


def test_the_prepared_folder_itself_still_trains(prepared):
    """The check refuses only what leaves the folder: dataprep's own output loads."""
    d = load_domains({"manifest": str(prepared / "manifest.json")}, seq_len=16, progress=False)
    assert len(d.train["prose"]) > 0


# ---------------------------------------------------------------------- prep deletes only its files

def test_prep_keeps_foreign_files_under_shards(tmp_path):
    good = corpus(tmp_path)
    out = tmp_path / "out"
    foreign = out / "shards" / "prose" / "train" / "my_notes.txt"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("mine")
    other = out / "shards" / "old_run_00000.bin"
    other.write_bytes(b"not dataprep's")
    data = {"domains": {"prose": {"train": good}}, "tokenizer": TOKENIZER}
    with pytest.raises(InputError, match=r"prep.output_dir: .*shards holds 2 file\(s\) dataprep did not write "
                                         r"\(e.g. .*old_run_00000.bin\).*prep.overwrite=true"):
        prepare(data, prep_cfg(out))
    assert foreign.read_text() == "mine" and other.read_bytes() == b"not dataprep's"
    assert not (out / "manifest.json").exists()
    # an explicit overwrite removes them and writes the output
    prepare(data, prep_cfg(out, overwrite=True))
    assert not foreign.exists() and not other.exists() and (out / "manifest.json").is_file()


def test_prep_rerun_replaces_only_its_own_shards(tmp_path):
    """A second recipe into the same folder deletes the first one's shards (listed in its manifest) and
    nothing else; a killed run's half-written shards are known through the log of what prep started."""
    good = corpus(tmp_path)
    more = tmp_path / "more.jsonl"
    more.write_text(GOOD.replace("document", "page"))
    out = tmp_path / "out"
    data = {"domains": {"prose": {"train": good}, "more": {"train": str(more)}}, "tokenizer": TOKENIZER}
    prepare(data, prep_cfg(out))
    first = set(listing(out / "shards"))
    assert "more/train/more_train_00000.bin" in first
    stray = out / "shards" / "more" / "train" / "more_train_00001.bin.tmp"     # as a killed writer leaves it
    with open(out / ".dataprep-written.txt", "a") as f:
        f.write("shards/more/train/more_train_00001\n")
    stray.write_bytes(b"half")
    prepare({"domains": {"prose": {"train": good}}, "tokenizer": TOKENIZER}, prep_cfg(out))
    assert not (out / "shards" / "more" / "train" / "more_train_00000.bin").exists() and not stray.exists()
    assert (out / "shards" / "prose" / "train" / "prose_train_00000.bin").is_file()


def test_prep_cli_refuses_foreign_files_with_exit_2(tmp_path):
    good = corpus(tmp_path)
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "thesis.pdf").write_bytes(b"%PDF")
    cdir = write_data_config(tmp_path, f"  prose: {{train: {good}}}\n")
    proc = run([PY, str(ROOT / "launch" / "prep.py"), "--config-dir", str(cdir), "data=mine",
                f"prep.output_dir={out}", "prep.execution.workers=1", "prep.execution.progress=false"],
               check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("prep: error: ") and "prep.output_dir: " in last and "thesis.pdf" in last, last
    assert "dataprep did not write" in last and "Traceback" not in proc.stderr
    assert (out / "shards" / "thesis.pdf").read_bytes() == b"%PDF"
