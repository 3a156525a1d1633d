"""Checkpoint folders: written into `step_N.tmp`, marked complete last, renamed; the one finder of the
newest complete checkpoint (`trainer.resume=latest`) and the check that refuses an incomplete one."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from dataflex.utils.errors import RunError, UserError

COMPLETE = "complete.json"


TMP_SUFFIX = ".tmp"


def mark_complete(folder: Path, step: int, **info) -> None:
    tmp = Path(folder) / (COMPLETE + TMP_SUFFIX)
    tmp.write_text(json.dumps({"step": step, "time": time.time(), **info}) + "\n")
    os.replace(tmp, Path(folder) / COMPLETE)


def checkpoint_info(folder: Path) -> dict:
    try:
        return json.loads((Path(folder) / COMPLETE).read_text())
    except (OSError, ValueError):
        return {}


def is_complete(folder: Path) -> bool:
    folder = Path(folder)
    return folder.is_dir() and not folder.name.endswith(TMP_SUFFIX) and (folder / COMPLETE).is_file()


def checkpoints(checkpoint_dir: Path) -> list:
    """Checkpoint folders (step_N) under checkpoint_dir, oldest first, temporary ones left out."""
    return sorted(p for p in Path(checkpoint_dir).glob("step_*") if p.is_dir() and not p.name.endswith(TMP_SUFFIX))


def complete_checkpoints(checkpoint_dir: Path) -> list:
    return [p for p in checkpoints(checkpoint_dir) if is_complete(p)]


def check_checkpoint(folder: Path) -> None:
    """Refuse a checkpoint that was not written to the end, naming the last complete one beside it."""
    folder = Path(folder)
    if is_complete(folder):
        return
    good = complete_checkpoints(folder.parent)
    advice = (f"the last complete checkpoint is {good[-1]}: trainer.resume={good[-1]}" if good else
              "no complete checkpoint is beside it")
    raise UserError(f"trainer.resume: checkpoint {folder} is incomplete (no {COMPLETE}: the run was killed while "
                    f"saving it, or it is not a dataflex checkpoint); {advice}")


def newest_checkpoint(folder) -> "Path":
    """The newest complete checkpoint of a run folder; incomplete ones (killed while saving) are skipped
    with a warning naming them."""
    from pathlib import Path

    from dataflex.run.checkpoints import checkpoints, is_complete

    ckpts = sorted(p for p in (Path(folder) / "checkpoints").glob("step_*") if p.is_dir())   # .tmp: a save killed midway
    good = [p for p in checkpoints(Path(folder) / "checkpoints") if is_complete(p)]
    if not good:
        extra = f" ({len(ckpts)} incomplete: killed while saving)" if ckpts else ""
        raise RunError(f"trainer.resume: no complete checkpoint under {Path(folder) / 'checkpoints'}{extra} "
                       "(runs save them with trainer.checkpoint_every=N)")
    for p in ckpts:
        if p.name > good[-1].name:
            print(f"warning: resume: skipping the incomplete checkpoint {p} (killed while saving); "
                  f"resuming from {good[-1]}", file=sys.stderr)
    return good[-1]


def resolve_resume(resume, run_dir) -> "Path | None":
    """trainer.resume as a checkpoint folder: a path to one, a run folder (its newest checkpoint), or
    `true` / `latest` (the newest checkpoint of this run's own folder, hydra.run.dir)."""
    from pathlib import Path

    if resume is None or resume is False or str(resume).lower() in ("", "null", "none", "false"):
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        return newest_checkpoint(run_dir)
    path = Path(str(resume))
    if (path / "checkpoints").is_dir():
        return newest_checkpoint(path)
    if not path.is_dir():
        raise RunError(f"trainer.resume: no checkpoint folder {path} (expected RUN_DIR/checkpoints/step_N, "
                       "a run folder, or `latest`)")
    from dataflex.run.checkpoints import check_checkpoint

    check_checkpoint(path)
    return path


def checkpoint_run_folder(ckpt) -> "Path | None":
    folder = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return folder if folder is not None and (folder / "config.yaml").is_file() else None
