"""torch C++-extension locks left by a killed first DeepSpeed start (every later start would wait on them)."""
from __future__ import annotations

import os
import sys
import time


def extension_roots() -> list:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return [root]
    base = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions")
    return [base]


def _busy_dirs() -> set:
    """Working folders of live processes (a compiler run by torch works inside the extension's folder)."""
    out = set()
    for pid in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                out.add(os.path.realpath(os.readlink(f"/proc/{pid}/cwd")))
            except OSError:
                pass
    return out


def clear_stale_extension_locks(max_age_s: float = 300.0, roots=None, quiet: bool = False) -> list:
    """Remove torch C++-extension `lock` files older than max_age_s whose folder no live process works
    in (a first DeepSpeed start killed while compiling leaves one, and every later start waits on it
    forever). Returns the removed paths; prints one line for each."""
    removed, busy = [], None
    for root in roots or extension_roots():
        if not os.path.isdir(root):
            continue
        for dirpath, _, names in os.walk(root):
            if "lock" not in names:
                continue
            lock = os.path.join(dirpath, "lock")
            try:
                age = time.time() - os.path.getmtime(lock)
            except OSError:
                continue
            if age < max_age_s:
                continue
            busy = _busy_dirs() if busy is None else busy
            if os.path.realpath(dirpath) in busy:
                continue
            try:
                os.unlink(lock)
            except OSError:
                continue
            removed.append(lock)
            if not quiet:
                print(f"dataflex: removed a stale torch extension lock {lock} ({age / 60:.0f} min old, no process "
                      "building there: an earlier start was killed while compiling)", file=sys.stderr)
    return removed
