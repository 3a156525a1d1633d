"""Checks that answer a bad input before any data is read or any step is trained (issue 11).

* `check_config(cfg)`: typed ranges of the trainer, model and backend keys (`SCHEMA`), naming key, value
  and what is allowed;
* `verify_shards(prefixes, hashes)`: a shard's sha256 against the manifest (or cache record) on first use,
  memoised by size and mtime in `.verified.json` beside the shards; a missing or truncated shard is named;
* checkpoints: `CheckpointWriter`-free helpers, `mark_complete`/`is_complete` (a marker written last into a
  temporary folder that is then renamed), `complete_checkpoints`, `check_checkpoint`;
* `clear_stale_extension_locks()`: torch's C++-extension `lock` left by a killed first DeepSpeed start.

Every user error here is a `UserError`: launch/train.py prints `train: error: ...` and exits 2.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class UserError(Exception):
    """A problem with what the user asked for or gave (config, inputs, run folder): one line, exit 2."""


class ConfigError(UserError, ValueError):
    pass


class ShardError(UserError, ValueError):
    pass


# ------------------------------------------------------------------------------------------- config

def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key -> (kind, check, what is allowed); kind: int | float | bool | choice | any
SCHEMA = {
    "trainer.max_steps": ("int", lambda v: v > 0, "an integer > 0"),
    "trainer.global_batch_size": ("int", lambda v: v > 0, "an integer > 0"),
    "trainer.lr": ("float", lambda v: v > 0, "a number > 0"),
    "trainer.warmup_steps": ("int", lambda v: v >= 0, "an integer >= 0"),
    "trainer.weight_decay": ("float", lambda v: v >= 0, "a number >= 0"),
    "trainer.grad_clip": ("float", lambda v: v >= 0, "a number >= 0 (0: no clipping)"),
    "trainer.seed": ("int", lambda v: True, "an integer"),
    "trainer.loss_reduction": ("choice", ("token", "sample"), "token or sample"),
    "trainer.nonfinite": ("choice", ("drop", "stop", "skip"), "drop, stop or skip"),
    "trainer.nprocs": ("int", lambda v: v >= 1, "an integer >= 1"),
    "trainer.eval_every": ("int", lambda v: v > 0, "an integer > 0"),
    "trainer.max_val_samples": ("int?", lambda v: v > 0, "null (all) or an integer > 0"),
    "trainer.probe_batch_size": ("int", lambda v: v > 0, "an integer > 0"),
    "trainer.check_ranks_every": ("int", lambda v: v >= 0, "an integer >= 0 (0: inside the loss gather only)"),
    "trainer.checkpoint_every": ("int", lambda v: v >= 0, "an integer >= 0 (0: no checkpoints)"),
    "trainer.ledger_flush_every": ("int", lambda v: v > 0, "an integer > 0"),
    "trainer.plot": ("bool", None, "true or false"),
    "trainer.overwrite": ("bool", None, "true or false"),
    "trainer.lean_loss": ("bool", None, "true or false"),
    "model.seq_len": ("int", lambda v: v > 1, "an integer > 1"),
    "model.vocab_size": ("int?", lambda v: v > 0, "null or an integer > 0"),
    "model.d_model": ("int", lambda v: v > 0, "an integer > 0"),
    "model.n_layers": ("int", lambda v: v > 0, "an integer > 0"),
    "model.n_heads": ("int", lambda v: v > 0, "an integer > 0"),
    "backend.zero_stage": ("int", lambda v: 0 <= v <= 3, "0, 1, 2 or 3"),
    "backend.bf16": ("bool", None, "true or false"),
}
_MISSING = object()


def check_value(key: str, value) -> None:
    kind, check, allowed = SCHEMA[key]
    if kind == "int?" and value is None:
        return
    ok = {"int": _int, "int?": _int, "float": _num, "bool": lambda v: isinstance(v, bool),
          "choice": lambda v: v in check}[kind](value)
    if ok and kind not in ("bool", "choice"):
        ok = bool(check(value))
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {allowed}")


def check_config(cfg) -> None:
    """Every key of SCHEMA present in `cfg` (a DictConfig or dict) has an allowed value."""
    for key in SCHEMA:
        group, leaf = key.split(".", 1)
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if node is None or not hasattr(node, "get") or leaf not in node:
            continue
        check_value(key, node.get(leaf))
    tr = cfg.get("trainer") or {}
    if _int(tr.get("global_batch_size")) and _int(tr.get("nprocs")) and tr["global_batch_size"] % tr["nprocs"]:
        raise ConfigError(f"trainer.global_batch_size={tr['global_batch_size']}: must divide by "
                          f"trainer.nprocs={tr['nprocs']} (each rank takes an equal share)")


def load_tokenizer_checked(path, key: str = "data.tokenizer"):
    """dataflex.tokenizer.load_tokenizer, a missing or unreadable file named with its config key."""
    from .tokenizer import load_tokenizer

    if not os.path.exists(str(path)):
        raise ConfigError(f"{key}: tokenizer not found: {path!r} (a tokenizers JSON file or a Hugging Face "
                          "tokenizer folder; leave the key out for the embedded corpus's)")
    try:
        return load_tokenizer(path)
    except Exception as e:      # tokenizers' parser: "expected value at line 1 column 1", ...
        raise ConfigError(f"{key}: {path} is not a readable tokenizer ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); expected a Hugging Face tokenizers JSON "
                          "file or tokenizer folder") from None


# ------------------------------------------------------------------------------------------- shards

VERIFIED = ".verified.json"


def verify_shards(prefixes, hashes) -> None:
    """sha256 of each shard's .bin against the recorded one, once per (path, size, mtime): a shard whose
    bytes changed or that was truncated stops the run, named. The memo lives beside the shards."""
    from dataprep.writer import sha256_file

    memos: dict = {}
    for prefix, want in zip(prefixes, hashes):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(prefix + ext):
                raise ShardError(f"shard {prefix + ext}: missing (the manifest or data cache lists it)")
        path = prefix + ".bin"
        if not want:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        memo_path = os.path.join(folder, VERIFIED)
        if folder not in memos:
            try:
                with open(memo_path) as f:
                    memos[folder] = json.load(f)
            except (OSError, ValueError):
                memos[folder] = {}
        memo = memos[folder]
        st = os.stat(path)
        stamp = f"{os.path.basename(path)}|{st.st_size}|{st.st_mtime_ns}"
        if memo.get(stamp) == want:
            continue
        got = sha256_file(path)
        if got != want:
            raise ShardError(f"shard {path}: its sha256 {got[:16]}... differs from the recorded {want[:16]}... "
                             f"({st.st_size} bytes now): the file was changed or truncated after it was written; "
                             "rebuild it (rerun launch/prep.py, or delete the data cache folder)")
        memo[stamp] = want
        try:
            tmp = f"{memo_path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, memo_path)
        except OSError:   # a read-only shard folder: verified again next time
            pass


def open_shard(prefix: str, opener):
    """`opener(prefix)` (megatron's IndexedDataset), a damaged shard named instead of a bare error."""
    try:
        return opener(prefix)
    except (AssertionError, ValueError, OSError, IndexError) as e:
        raise ShardError(f"shard {prefix}.bin/.idx: cannot be read ({type(e).__name__}: {e}); the file is "
                         "truncated or damaged: rebuild it") from None


# ------------------------------------------------------------------------------------- checkpoints

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


def fault(point: str, step: int) -> None:
    """Tests: DATAFLEX_FAULT=step:N or checkpoint:N kills this process (SIGKILL) at that point."""
    spec = os.environ.get("DATAFLEX_FAULT", "")
    if spec and spec == f"{point}:{step}" and int(os.environ.get("RANK", "0")) == 0:
        import signal

        sys.stdout.flush(), sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------ stale torch-extension lock

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
