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

import os
import sys

from dataflex.utils.errors import ConfigError, RunError

# ------------------------------------------------------------------------------------------- config

def _int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _path(v):
    return isinstance(v, str) and bool(v.strip())


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
    "trainer.packing": ("bool", None, "true or false"),
    "trainer.checkpoint_on_signal": ("bool", None, "true or false"),
    "trainer.memory_check": ("bool", None, "true or false"),
    "model.seq_len": ("int", lambda v: v > 1, "an integer > 1"),
    "model.vocab_size": ("int?", lambda v: v > 0, "null or an integer > 0"),
    "model.d_model": ("int", lambda v: v > 0, "an integer > 0"),
    "model.n_layers": ("int", lambda v: v > 0, "an integer > 0"),
    "model.n_heads": ("int", lambda v: v > 0, "an integer > 0"),
    "backend.zero_stage": ("int", lambda v: 0 <= v <= 3, "0, 1, 2 or 3"),
    "backend.bf16": ("bool", None, "true or false"),
    "backend.transformer_engine": ("bool", None, "true or false"),
    "backend.config": ("str?", None, "null or the path of a DeepSpeed JSON file"),
}
_MISSING = object()


def check_value(key: str, value) -> None:
    kind, check, allowed = SCHEMA[key]
    if kind == "int?" and value is None:
        return
    if kind == "str?" and value is None:
        return
    ok = {"int": _int, "int?": _int, "float": _num, "bool": lambda v: isinstance(v, bool), "str?": _path,
          "choice": lambda v: v in check}[kind](value)
    if ok and kind not in ("bool", "choice", "str?"):
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
    data = cfg.get("data") if hasattr(cfg, "get") else None
    if isinstance(data, (list, tuple)) or type(data).__name__ == "ListConfig":
        raise ConfigError(f"data: the data config{_file_of('data')} is a YAML list (lines starting with '- '); a data "
                          "config is a mapping: `tokenizer: PATH` and `domains: {NAME: {train: PATH}}`, or "
                          "`manifest: PATH`")
    check_interpolations(cfg)
    if hasattr(data, "get"):      # domain and subtask names become folder names: checked before any file is touched
        from dataflex.data.config import check_names

        try:
            check_names(data)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def config_file(group: str) -> str:
    """The YAML file Hydra chose for a config group, for error messages."""
    from hydra.core.hydra_config import HydraConfig

    runtime = HydraConfig.get().runtime
    choice = runtime.choices.get(group)
    for source in runtime.config_sources:
        if source.provider in ("main", "command-line") and source.schema == "file":
            path = os.path.join(source.path, group, f"{choice}.yaml")
            if os.path.exists(path):
                return path
    return f"{group}={choice}"


def _file_of(group: str) -> str:
    """` (FILE)`: the file Hydra chose for a group, when inside a Hydra job; else nothing."""
    try:
        return f" ({config_file(group)})"
    except Exception:       # no Hydra job (a test, the API): the message names the key alone
        return ""


def check_interpolations(cfg) -> None:
    """A `${key}` that names no key of the config: one line naming where it is, not OmegaConf's error block."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationKeyError

    if not OmegaConf.is_config(cfg):
        return
    try:
        OmegaConf.to_container(cfg, resolve=True)
    except InterpolationKeyError as e:
        key = getattr(e, "full_key", None) or "config"
        group = str(key).split(".", 1)[0].split("[", 1)[0]
        raise ConfigError(f"{key}: {str(e).splitlines()[0]}: an interpolation ${{...}} there names a key the config "
                          f"does not have{_file_of(group) if group in ('data', 'model') else ''}") from None
    except Exception:       # other resolvers (`${hydra:...}` outside a job, `???`): judged where they are used
        return


def check_deepspeed_config(cfg, world_size: int) -> None:
    """`backend.config=PATH` (backend=deepspeed): made absolute (ranks and resumes find it from any folder),
    read, and its batch sizes checked against the trainer's before any data is read (a ConfigError names both)."""
    backend = cfg.get("backend") if hasattr(cfg, "get") else None
    if not hasattr(backend, "get") or backend.get("name") != "deepspeed" or not backend.get("config"):
        return
    from dataflex.backends.deepspeed import deepspeed_config, read_deepspeed_config

    path = os.path.abspath(os.path.expanduser(str(backend.get("config"))))
    user = read_deepspeed_config(path)
    tr = cfg.get("trainer") or {}
    deepspeed_config(user, int(tr.get("global_batch_size", 1)), world_size, float(tr.get("grad_clip", 1.0)),
                     int(backend.get("zero_stage", 0) or 0), bool(backend.get("bf16", False)),
                     source=f"backend.config={path}")
    try:
        from omegaconf import open_dict

        with open_dict(backend):
            backend["config"] = path
    except (ImportError, ValueError, TypeError):
        backend["config"] = path


# ------------------------------------------------------------------------------------------- shards

# ------------------------------------------------------------------------------------- checkpoints

# ------------------------------------------------------------------------ stale torch-extension lock


def check_known_keys(cfg, group: str, reference: dict, hint: str = "") -> None:
    """Refuse keys of cfg[group] absent from the group's reference config (a typo such as
    `+trainer.max_step=10` would otherwise be silently ignored)."""
    import difflib

    unknown = [k for k in cfg.get(group) or {} if k not in reference]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, list(reference), n=1)
        advice = f"did you mean {group}.{close[0]}? " if close else ""
        raise RunError(f"{group}.{k}: unknown {group} setting ({advice}known: {', '.join(reference)}){hint}")


def reference_keys(config_dir: str, group: str, name: str) -> dict | None:
    """The keys of configs/<group>/<name>.yaml (None if there is no such file, e.g. a user's own group)."""
    import yaml

    path = os.path.join(config_dir, group, f"{name}.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f) or {}


def _override_key(override: str) -> tuple[str, bool]:
    key = override.split("=", 1)[0]
    deleted = key.startswith("~")
    key = key.lstrip("+~")
    return key.split("@", 1)[0], deleted


def check_override_typos(argv: list[str], config_dir: str) -> None:
    """`trainer.max_step=10` (no `+`): say which key was meant, before Hydra advises `+trainer.max_step=10`."""
    if any(a.split("=", 1)[0] in ("trainer", "+trainer", "backend", "+backend") for a in argv) or any(
            a in ("--config-dir", "-cd") or a.startswith(("--config-dir=", "-cd=")) for a in argv):
        return  # another trainer config: Hydra and the run's own check judge
    reference = reference_keys(config_dir, "trainer", "default") or {}
    for arg in argv:
        key = arg.split("=", 1)[0]
        if "=" in arg and key.startswith("trainer.") and key.count(".") == 1 and key[8:] not in reference:
            import difflib

            close = difflib.get_close_matches(key[8:], list(reference), n=1)
            advice = f"did you mean trainer.{close[0]}? " if close else ""
            print(f"train: error: {key}: unknown trainer setting ({advice}known: {', '.join(reference)})",
                  file=sys.stderr)
            sys.exit(2)


# ---------------------------------------------------------------------------------- bounded YAML

# ------------------------------------------------------------------- what a plugin needs, up front

