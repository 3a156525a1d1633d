"""File helpers shared by every layer: an exclusive lock across processes (dataprep's), and atomic writes
(temporary name, fsync, rename, fsync of the folder) for every file that other ranks read."""
from __future__ import annotations

import json
import os
import threading
import uuid
from typing import Callable, Optional

from dataprep.writer import file_lock, sha256_file  # noqa: F401


def atomic_write(path: str, write: Callable, binary: bool = False) -> None:
    """`write(f)` into a temporary file beside `path` whose name no other process or thread uses
    (pid, thread, random), flushed and fsynced, renamed over `path`, the folder fsynced: a reader sees
    the previous file or the whole new one, never a part, even after a crash."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb" if binary else "x") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def atomic_json(path: str, content, **kw) -> None:
    atomic_write(path, lambda f: json.dump(content, f, **kw))


def fsync_dir(folder: str) -> None:
    """Make the folder's entries (a rename, a new file) durable; a no-op where a folder cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def disk_full(exc: BaseException, path) -> Optional[str]:
    """`disk full: PATH ...` naming the disk (its mount point, free and total space) when `exc` is a write
    that ran out of space: OSError ENOSPC, or torch's C++ writer failing (`file write failed`) on a disk with
    under 64 MiB free; else None."""
    import errno
    import shutil

    nospace = isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
    at = os.path.abspath(str(path))
    disk = at
    while not os.path.exists(disk) and os.path.dirname(disk) != disk:
        disk = os.path.dirname(disk)
    try:
        usage = shutil.disk_usage(disk)
    except OSError:
        usage = None
    if not nospace and not (isinstance(exc, RuntimeError) and "write failed" in str(exc) and usage is not None
                            and usage.free < 64 << 20):
        return None
    while not os.path.ismount(disk) and os.path.dirname(disk) != disk:
        disk = os.path.dirname(disk)
    room = f", {usage.free / 2**20:,.0f} MiB free of {usage.total / 2**30:,.1f} GiB" if usage else ""
    return f"disk full: no space left to write {at} (the disk mounted at {disk}{room})"
