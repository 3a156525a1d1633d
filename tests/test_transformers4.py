"""DataFlexTrainer on the last transformers 4 release: the Trainer hooks dataflex overrides changed between 4
and 5 (v4 has no `get_resumed_dataloader` and skips a resumed epoch's batches itself; v4 has no
`loss_is_scaled_for_ga` and divides the loss by the micro-batch count). A separate environment holds
transformers 4.57.6 and the Hugging Face packages it pins (huggingface_hub < 1, tokenizers <= 0.23.0,
datasets 4); everything else, torch included, is this interpreter's own packages, reached after the
environment's own (a `.pth` line), never reinstalled. The Trainer tests (resume, gradient accumulation,
evaluation, Sheared, ZeRO-3 through TrainingArguments, `datasets` as domains, TRL's SFTTrainer on
the TRL release installed here) then run there.

Built once (pip from PyPI, about a minute) under `$DATAFLEX_CACHE/venv-transformers4` (default
`~/.cache/dataflex/venv-transformers4`), rebuilt when the pins below change: `pytest -m transformers4`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PINS = ["transformers==4.57.6", "huggingface_hub>=0.34,<1.0", "tokenizers>=0.22,<=0.23.0", "datasets>=4,<5"]
TESTS = ["tests/test_hf_trainer.py", "tests/test_hf_trainer_deepspeed.py", "tests/test_hf_trainer_datasets.py",
         "tests/test_trl_sft.py"]
pytestmark = [pytest.mark.slow, pytest.mark.transformers4]


def venv_dir() -> Path:
    cache = os.environ.get("DATAFLEX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dataflex")
    return Path(cache) / "venv-transformers4"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def build_venv(venv: Path) -> None:
    """A plain venv of this interpreter's base Python, the pinned packages installed without their dependencies,
    then this interpreter's site-packages appended to its path (after its own: its transformers 4 comes first)."""
    stamp = venv / "dataflex-pins.json"
    base = sysconfig.get_paths()["purelib"]
    want = {"pins": PINS, "base": base, "python": sys.version}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return
    base_python = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    subprocess.run([str(base_python), "-m", "venv", "--clear", str(venv)], check=True)
    pip = subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "-q", "--no-deps", *PINS],
                         capture_output=True, text=True)
    assert pip.returncode == 0, f"installing {PINS} failed:\n{pip.stdout[-2000:]}\n{pip.stderr[-2000:]}"
    purelib = subprocess.run([str(venv_python(venv)), "-c",
                              "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "zz_dataflex_base.pth").write_text(f"import site; site.addsitedir({base!r})\n")
    stamp.write_text(json.dumps(want))


def test_trainer_on_transformers_4():
    venv = venv_dir()
    build_venv(venv)
    py = str(venv_python(venv))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):    # another test's process group
        env.pop(var, None)
    versions = subprocess.run([py, "-c", "import json, torch, transformers; print(json.dumps([torch.__version__, "
                               "torch.__file__, transformers.__version__]))"], capture_output=True, text=True, env=env)
    assert versions.returncode == 0, versions.stderr[-2000:]
    torch_version, torch_file, transformers_version = json.loads(versions.stdout.strip().splitlines()[-1])
    assert (torch_version, torch_file) == (torch.__version__, torch.__file__)       # this interpreter's torch, as is
    assert transformers_version.startswith("4."), transformers_version
    run = subprocess.run([py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, "-k", "not two_ranks"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=1500)
    print(run.stdout.splitlines()[-1] if run.stdout else "")         # the inner summary, with -s / -rA
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "failed" not in run.stdout.splitlines()[-1]
