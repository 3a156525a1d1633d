"""Names are names, paths stay in their folder: the checks every writer and deleter runs first.

* ``check_name(name, key)``: a domain, split or subtask name becomes part of file names (``shards/<domain>/<split>/``
  in prep's output, ``<cache>/<key>/<domain>/<split>/`` in the data cache), so it must be a plain name:
  letters, digits, ``_``, ``-``, ``.`` and ``+``, at most 128 characters, not starting with ``.`` or ``-``, no
  ``..``, no separator, not absolute. Anything else is refused, naming the config key, before any file is touched.
* ``inside(path, folder, what)``: ``path`` resolved (symlinks followed) and proven to lie inside ``folder``
  (resolved too); raised otherwise. Every path prep and the data cache write or delete goes through it.
"""
from __future__ import annotations

import os
import re

NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9_.+-]{0,127}")
NAME_RULE = ("letters, digits, '_', '-', '.' and '+', at most 128 characters, not starting with '.' or '-', "
             "no '..' and no path separator")


class PathEscape(ValueError):
    """A path that would leave the folder it belongs to."""


def check_name(name, key: str, error=ValueError) -> str:
    """``name`` if it is a safe name (see the module docstring), else ``error`` naming ``key``."""
    if not isinstance(name, str) or isinstance(name, bool):
        raise error(f"{key}: the name {name!r} is not a string; a name is {NAME_RULE} (quote it in YAML)")
    if not NAME.fullmatch(name) or ".." in name:
        raise error(f"{key}: {name!r} is not a valid name: a domain, split or subtask name becomes a folder "
                    f"name, so it holds {NAME_RULE}")
    return name


def _outside(path, folder):
    real, root = os.path.realpath(path), os.path.realpath(folder)
    return real, root, real != root and os.path.commonpath([real, root]) != root


def inside(path, folder, what: str = "path", error=PathEscape) -> str:
    """The resolved ``path``; ``error`` unless it lies inside (or is) the resolved ``folder``."""
    real, root, out = _outside(path, folder)
    if out:
        raise error(f"{what} {path} resolves to {real}, outside {root}: refused (nothing is written or deleted there)")
    return real


def relative_inside(rel, folder, what: str = "path", error=PathEscape) -> str:
    """``folder/rel`` resolved, for a path recorded relative to ``folder`` (a manifest's shard prefix):
    refused when ``rel`` is absolute or leads out of ``folder`` (``..``, a symlink)."""
    if not isinstance(rel, str) or not rel or os.path.isabs(rel):
        raise error(f"{what} {rel!r}: not a path relative to {folder}; refused")
    real, root, out = _outside(os.path.join(folder, rel), folder)
    if out:
        raise error(f"{what} {rel!r} resolves to {real}, outside {root}; refused")
    return real
