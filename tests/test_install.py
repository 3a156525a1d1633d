"""The package as a user installs it: `pip install <the clone>` and the built wheel, each into a fresh virtual
environment with no clone on the path, then the `dataflex` command trains the demo for 20 steps from an empty
folder, `dataflex compare` writes its page, and `dataflex --help` lists the verbs.

The heavy dependencies (torch, DeepSpeed, megatron-core, ...) are not downloaded again: the fresh environment
sees this project's environment's site-packages through a plain path in a .pth file, which does not run that
environment's own .pth files, so its editable install of the clone stays invisible."""
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERBS = ("train", "prep", "compare", "score", "where", "regmix", "corpus")
pytestmark = pytest.mark.slow


def fresh_env(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    deps = [p for p in site.getsitepackages() if p.endswith("site-packages")]
    (Path(purelib) / "project_deps.pth").write_text("\n".join(deps) + "\n")
    return py


def pip_install(py: Path, what: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-build-isolation",
                    "--quiet", what], check=True, cwd=cwd)


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DATAFLEX_CACHE")}
    return dict(env, WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                    str(out), str(ROOT)], check=True, cwd=out)
    return next(out.glob("dataflex_train-*.whl"))


@pytest.mark.parametrize("source", ["folder", "wheel"])
def test_installed_command_trains_and_compares_from_an_empty_folder(source, wheel, tmp_path):
    py = fresh_env(tmp_path / "venv")
    work = tmp_path / "empty"
    work.mkdir()
    pip_install(py, str(ROOT) if source == "folder" else str(wheel), work)
    env = clean_env()
    env["DATAFLEX_CACHE"] = str(tmp_path / "cache")
    where = subprocess.run([str(py), "-c", "import dataflex, dataprep; print(dataflex.__file__, dataprep.__file__)"],
                           capture_output=True, text=True, check=True, cwd=work, env=env).stdout
    assert str(ROOT) not in where and str(tmp_path / "venv") in where, where

    cmd = tmp_path / "venv" / "bin" / "dataflex"
    helped = subprocess.run([str(cmd), "--help"], capture_output=True, text=True, check=True, cwd=work, env=env)
    assert all(f"  {verb} " in helped.stdout for verb in VERBS), helped.stdout

    train = subprocess.run([str(cmd), "train", "backend=torch", "logger=none", "+mixer=bandit", "trainer.max_steps=20",
                            "trainer.eval_every=10", "trainer.max_val_samples=16", "hydra.run.dir=runs/bandit"],
                           capture_output=True, text=True, cwd=work, env=env, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((work / "runs" / "bandit" / "summary.json").read_text())
    assert summary["steps"] == 20 and set(summary["val_loss"]) == {"prose", "code", "math", "noise"}

    compare = subprocess.run([str(cmd), "compare", "runs"], capture_output=True, text=True, cwd=work, env=env,
                             timeout=300)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert (work / "runs" / "report.md").is_file() and "bandit" in (work / "runs" / "report.md").read_text()

    unknown = subprocess.run([str(cmd), "trian"], capture_output=True, text=True, cwd=work, env=env)
    assert unknown.returncode == 2 and "unknown verb 'trian'" in unknown.stderr
