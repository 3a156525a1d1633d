"""One writer per run folder: `RUN_DIR/.dataflex.lock`, an exclusive flock held for the run's lifetime.

A second run started into a folder whose lock is held is refused, naming the process that holds it
(its pid, host and start time are written into the lock file). The lock is released by the kernel when
its process ends, however it ends (kill -9 included), so a dead run never blocks its retry or resume.
Ranks started by dataflex's own launcher (`trainer.nprocs=N`) run under their parent's lock
(`DATAFLEX_RUN_LOCK` names its pid).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from dataflex.utils.errors import RunError

LOCK_NAME = ".dataflex.lock"
ENV = "DATAFLEX_RUN_LOCK"


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info['pid']} on {info.get('host', '?')}, started {started}"


def _refusal(run_dir: Path, path: Path) -> RunError:
    return RunError(f"{run_dir} is in use by a running training ({_holder(path)}; lock {path}): two runs never "
                    "write one folder. Wait for it or stop it (kill -TERM PID stops it politely), or choose "
                    "another hydra.run.dir")


class RunLock:
    """`RunLock.acquire(run_dir)` takes the lock or raises `RunError`; `release()` gives it back."""

    def __init__(self, path: Path, fd):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir) -> "RunLock | None":
        run_dir = Path(run_dir)
        path = run_dir / LOCK_NAME
        if os.environ.get(ENV) and _holder(path).startswith(f"pid {os.environ[ENV]} "):
            return None      # a rank of a job whose launcher (our parent) holds the lock
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _refusal(run_dir, path) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode())
        os.environ[ENV] = str(os.getpid())      # ranks this process starts run under this lock
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
            if os.environ.get(ENV) == str(os.getpid()):
                os.environ.pop(ENV)


def check_not_running(run_dir) -> None:
    """Before Hydra writes into a folder named on the command line (its `.hydra/`, `train.log`): refuse if
    a run holds it. A probe only: the lock is taken for real once the run folder is settled."""
    path = Path(run_dir) / LOCK_NAME
    if not path.is_file():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        if not (os.environ.get(ENV) and _holder(path).startswith(f"pid {os.environ[ENV]} ")):
            raise _refusal(Path(run_dir), path) from None
    finally:
        os.close(fd)


def hold_run_folder(run_dir) -> "RunLock | None":
    """`RunLock.acquire`, a refusal printed as `train: error: ...` with exit 2 (nothing in the folder touched)."""
    import sys

    try:
        return RunLock.acquire(run_dir)
    except RunError as e:
        print(f"train: error: {e}", file=sys.stderr)
        sys.exit(2)
