"""Files dataflex is given are read, never executed: `torch.load(weights_only=True)` for every checkpoint,
reference run and feature file (tensors, numbers, strings and plain containers only; a pickle that asks to
import or call anything else is refused before it runs), numpy arrays with `allow_pickle=False`, JSON for
the rest.

`load_weights_only(path, what)` is the one loader; a refusal is a `UnsafeFileError` (one line, exit 2) naming
the file and the first thing it asked to run. `check_weights_only(folder, what)` runs it over every `.pt`
file of a checkpoint folder that a third-party engine (DeepSpeed) will later unpickle in full, so that
engine reads only files that passed the restricted unpickler.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from dataflex.utils.errors import UserError


class UnsafeFileError(UserError):
    """A file that a weights-only load refused (it would run code, or is not a torch file at all)."""


def _reason(e: Exception) -> str:
    text = str(e)
    for line in text.splitlines():      # torch's message: the line naming the unsupported global
        if "Unsupported global" in line or "GLOBAL" in line or "Unsupported operand" in line:
            return line.strip().rstrip(".")
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:300]


def load_weights_only(path, what: str = "file", map_location="cpu", **kwargs):
    """`torch.load(path, weights_only=True)`; a file that needs full unpickling is refused, named."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"{what} {path}: refused: not a weights-only file ({_reason(e)}); dataflex loads tensors and plain "
            "containers only (torch.load(weights_only=True)) and never runs code from a file it is given. "
            "If you made this file, save tensors and plain Python containers") from None
    except (RuntimeError, EOFError, ValueError) as e:
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise UnsafeFileError(f"{what} {path}: refused: not a weights-only file ({_reason(e)})") from None
        raise UnsafeFileError(f"{what} {path}: cannot be read as a torch file ({type(e).__name__}: "
                              f"{_reason(e)}); it is damaged or not a checkpoint") from None


def check_weights_only(folder, what: str = "checkpoint", safe_globals=(), pattern: str = "*.pt") -> None:
    """Every file matching `pattern` under `folder` passes a weights-only load (with `safe_globals` allowed),
    memory-mapped so the check costs no copy of the weights."""
    import torch

    for p in sorted(Path(folder).rglob(pattern)):
        with torch.serialization.safe_globals(list(safe_globals)):
            try:
                load_weights_only(p, what, mmap=True)
            except UnsafeFileError as e:
                if "cannot be read" not in str(e):
                    raise
                load_weights_only(p, what)       # an old (non-zip) torch file cannot be memory-mapped
