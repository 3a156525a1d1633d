"""Where the benchmark corpus's raw material comes from: Debian packages fetched with `apt-get download`
and unpacked with `dpkg-deb -x` into the cache (nothing installed on the system; an already installed
package is read in place), the `champ-dataset` wheel, and this Python's standard library."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

PYDOC = f"python{sys.version_info.major}.{sys.version_info.minor}-doc"
DEBS = ("r-cran-janeaustenr", "fortunes", "fortunes-min", "dict-foldoc", PYDOC)


class MissingSource(RuntimeError):
    """A source that cannot be had here; the message says what is missing and how to get it."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _installed_files(pkg: str) -> list[Path] | None:
    """The files of an installed Debian package (`dpkg -L`), or None when it is not installed."""
    if not shutil.which("dpkg-query"):
        return None
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    if r.returncode or not r.stdout.endswith(" installed"):
        return None
    out = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True).stdout.split("\n")
    return [Path(p) for p in out if p and Path(p).is_file()]


def fetch_deb(pkg: str, cache: Path) -> dict:
    """{"files": [Path], "version": ..., "sha256": ...} for one package: installed, already unpacked in
    `cache`, or downloaded and unpacked now. Raises MissingSource."""
    files = _installed_files(pkg)
    if files is not None:
        ver = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True).stdout
        return {"files": files, "version": ver, "sha256": None, "from": "installed"}
    debs, target = cache / "debs", cache / "unpacked" / pkg
    done = target / ".done"
    if not done.exists():
        for tool in ("apt-get", "dpkg-deb"):
            if not shutil.which(tool):
                raise MissingSource(f"{pkg}: `{tool}` not found (the Debian package tools fetch it)")
        debs.mkdir(parents=True, exist_ok=True)
        for old in debs.glob(f"{pkg}_*.deb"):
            old.unlink()
        r = _download(pkg, debs)
        if r.returncode:
            msg = (r.stderr.strip().splitlines() or ["apt-get download failed"])[-1]
            raise MissingSource(f"{pkg}: `apt-get download {pkg}` failed ({msg})")
        deb = next(debs.glob(f"{pkg}_*.deb"))
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
        done.write_text(deb.name + "\n" + sha256(deb) + "\n")
    name, digest = done.read_text().split()
    version = name.split("_")[1].replace("%3a", ":")
    files = [p for p in target.rglob("*") if p.is_file() and p.name != ".done"]
    return {"files": files, "version": version, "sha256": digest, "from": "apt-get download"}


def _download(pkg: str, folder: Path) -> subprocess.CompletedProcess:
    """`apt-get download PKG` in `folder`; once more after `apt-get update` if the lists lack it."""
    def run(*cmd):
        return subprocess.run(cmd, cwd=folder, capture_output=True, text=True)

    r = run("apt-get", "download", pkg)
    if r.returncode and os.geteuid() == 0:
        run("apt-get", "update")
        r = run("apt-get", "download", pkg)
    return r


def pick(files: list[Path], suffix: str) -> list[Path]:
    return sorted(p for p in files if str(p).endswith(suffix))


def champ_json() -> Path:
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.origin:
        raise MissingSource("champ-dataset: not installed (`pip install champ-dataset`)")
    path = Path(spec.origin).parent / "dataset_files" / "v0.json"
    if not path.is_file():
        raise MissingSource(f"champ-dataset: {path} missing (reinstall `pip install champ-dataset`)")
    return path


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None
