"""Issue 20, the rest of "every bad input answered": each case ends with one `train: error:` / `prep: error:`
line and exit 2 (no traceback), leaving the user's files as they were. The rows of
docs/guides/troubleshooting.md's table name the same cases."""
import hashlib
import sys
import time
from pathlib import Path

import pytest
from test_launch import ROOT, run

from dataflex.run.config import YAML_ALIAS_LIMIT, named_yaml_files, yaml_alias_uses

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
