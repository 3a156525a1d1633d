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

import importlib
import os
import sys

from dataflex.core.settings import check_settings
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
    "model.seq_len": ("int", lambda v: v > 1, "an integer > 1"),
    "model.vocab_size": ("int?", lambda v: v > 0, "null or an integer > 0"),
    "model.d_model": ("int", lambda v: v > 0, "an integer > 0"),
    "model.n_layers": ("int", lambda v: v > 0, "an integer > 0"),
    "model.n_heads": ("int", lambda v: v > 0, "an integer > 0"),
    "backend.zero_stage": ("int", lambda v: 0 <= v <= 3, "0, 1, 2 or 3"),
    "backend.bf16": ("bool", None, "true or false"),
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


PLUGIN_GROUPS = ("mixer", "selector", "reweighter")


def plugin_class(group: str, target: str):
    """The class a plugin group's `_target_` names (a dotted path; a name, never code)."""
    module, _, name = str(target).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name) if module else None
    except (ImportError, AttributeError):
        cls = None
    if not isinstance(cls, type):
        raise ConfigError(f"{group}._target_={target}: not a plugin class (module.Class)")
    return cls


def _resolved(node) -> dict:
    """The group's keys with interpolations resolved; a key whose interpolation needs a running Hydra job
    (`${hydra:runtime.output_dir}`) when there is none is left out: it is a path the config made, not a typo."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

    out = {}
    for key in node:
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{node._get_full_key(key)}: missing (??? in its config); give it on the command line: "
                              f"{node._get_full_key(key)}=VALUE")
        try:
            value = node[key]
            out[key] = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        except (InterpolationResolutionError, MissingMandatoryValue):
            continue
    return out


def check_plugin_settings(cfg, groups=PLUGIN_GROUPS) -> None:
    """Every setting of the mixer, selector and reweighter in `cfg` by type and range (dataflex.core.settings),
    before any data is read: one `train: error:` line for the first wrong one."""
    from omegaconf import OmegaConf

    for group in groups:
        node = cfg.get(group) if hasattr(cfg, "get") else None
        if not node:
            continue
        given = _resolved(node) if OmegaConf.is_config(node) else dict(node)
        if "_target_" not in given:
            raise ConfigError(f"{group}: no _target_ (a plugin class, e.g. +{group}=NAME)")
        check_settings(plugin_class(group, given["_target_"]), given, group)


# ---------------------------------------------------------------------------------- bounded YAML

YAML_ALIAS_LIMIT = 10_000     # alias uses after expansion; a real config has a handful, a 300-byte bomb millions


def yaml_alias_uses(text: str, limit: int = YAML_ALIAS_LIMIT) -> int:
    """How many aliases (`*name`) a YAML text holds once every alias is expanded, as a loader building plain
    containers (OmegaConf, Hydra) expands them; counted on the parser's events, never expanded (linear in the
    text), and capped at limit + 1. A recursive alias counts as over the limit."""
    import yaml

    anchors, stack, roots = {}, [], []
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            node: list = []
            (stack[-1] if stack else roots).append(node)
            if event.anchor:
                anchors[event.anchor] = node
            stack.append(node)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            stack.pop()
        elif isinstance(event, yaml.AliasEvent):
            (stack[-1] if stack else roots).append(("alias", event.anchor))
    memo: dict = {}

    def uses(node) -> int:
        if id(node) in memo:
            return memo[id(node)]
        memo[id(node)] = limit + 1          # while being counted: a recursive alias back into it
        n = 0
        for child in node:
            if isinstance(child, tuple):
                target = anchors.get(child[1])
                n += 1 + (uses(target) if isinstance(target, list) else 0)
            else:
                n += uses(child)
            if n > limit:
                n = limit + 1
                break
        memo[id(node)] = n
        return n

    try:
        return min(limit + 1, sum(uses(root) if isinstance(root, list) else 1 for root in roots))
    except RecursionError:
        return limit + 1


def _option_values(argv: list[str], *names: str) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                out.append(argv[i + 1])
            elif arg.startswith(name + "="):
                out.append(arg[len(name) + 1:])
    return out


def named_yaml_files(argv: list[str], config_dir: str, config_name: str) -> list[str]:
    """The config files this command line makes Hydra compose: the primary config, the defaults its list names,
    and every `GROUP=NAME` (a sweep's `GROUP=A,B` too), in the --config-dir folders and the package's configs."""
    import yaml

    dirs = [os.path.abspath(os.path.expanduser(d)) for d in _option_values(argv, "--config-dir", "-cd")]
    dirs += [os.path.abspath(os.path.expanduser(d)) for d in _option_values(argv, "--config-path", "-cp")]
    dirs.append(config_dir)
    name = (_option_values(argv, "--config-name", "-cn") or [config_name])[-1]
    choices: list[tuple[str, str]] = []
    skip = {i + 1 for i, a in enumerate(argv) if a in ("--config-dir", "-cd", "--config-path", "-cp",
                                                        "--config-name", "-cn")}
    for i, arg in enumerate(argv):
        if i in skip or arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~").split("@", 1)[0]
        if "." in key or not key or "(" in value:
            continue
        choices += [(key, v.strip()) for v in value.split(",") if v.strip()]
    files = [os.path.join(d, f"{name.removesuffix('.yaml')}.yaml") for d in dirs]
    files = [f for f in files if os.path.isfile(f)]
    for primary in files[:1]:
        try:
            with open(primary) as f:
                text = f.read()
            defaults = (yaml.safe_load(text) or {}).get("defaults", []) if yaml_alias_uses(text) <= \
                YAML_ALIAS_LIMIT else []
        except (OSError, yaml.YAMLError, AttributeError):
            defaults = []
        for entry in defaults if isinstance(defaults, list) else []:
            if isinstance(entry, dict):
                for k, v in entry.items():
                    if isinstance(k, str) and isinstance(v, str):
                        choices.append((k.split()[-1].split("@", 1)[0], v))
    for group, choice in choices:
        for d in dirs:
            path = os.path.join(d, group, f"{choice.removesuffix('.yaml')}.yaml")
            if os.path.isfile(path) and path not in files:
                files.append(path)
    return files


def check_yaml_aliases(argv: list[str], config_dir: str, prog: str, config_name: str,
                       limit: int = YAML_ALIAS_LIMIT) -> None:
    """Refuse, before Hydra composes them, config files whose aliases expand past `limit` (a few hundred bytes
    of nested aliases would otherwise cost minutes and gigabytes): `PROG: error: FILE: more than N YAML
    aliases (an alias bomb?)`, exit 2; a file that is not valid YAML: `PROG: error: FILE:LINE:COL: not valid
    YAML: ...`, exit 2 (not Hydra's traceback)."""
    import yaml

    for path in named_yaml_files(argv, config_dir, config_name):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                uses = yaml_alias_uses(f.read(), limit)
        except OSError:
            continue
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            what = "; ".join(x for x in (e.context, e.problem) if x)
            hint = " (a ${...} inside {...} needs quotes: '${...}')" if "but got '{'" in what else ""
            print(f"{prog}: error: {path}{where}: not valid YAML: {what}{hint}", file=sys.stderr)
            sys.exit(2)
        except yaml.YAMLError as e:
            print(f"{prog}: error: {path}: not valid YAML: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        if uses > limit:
            print(f"{prog}: error: {path}: more than {limit:,} YAML aliases (an alias bomb?); a config uses "
                  "a few aliases at most", file=sys.stderr)
            sys.exit(2)


# ------------------------------------------------------------------- what a plugin needs, up front

def check_plugin_needs(groups: list, plugins: list, domains: list, datasets: dict) -> None:
    """Before the first step (and so even for a run that ends inside a plugin's warm-up): every target a plugin
    aims at (`target`, the anchor's `anchor`) is a domain or a dataset the run has (the data config's `target`,
    `val`), and every reference run (`reference=RUN_DIR` of doremi, rho, rho1) holds a checkpoint."""
    for group, plugin in zip(groups, plugins):
        for attr in ("target", "anchor"):
            if attr == "target" and getattr(plugin, "selection", None):     # LESS trains on a given selection:
                continue                                                    # it never reads its target
            specs = getattr(plugin, attr, None)
            specs = [specs] if isinstance(specs, str) else specs if isinstance(specs, (list, tuple)) else []
            for spec in specs:
                if not isinstance(spec, str) or spec in domains or datasets.get(spec) is not None:
                    continue
                if spec == "target":
                    raise ConfigError(f"{group}.{attr}=target: the data config has no target set (`target: {{val: "
                                      f"PATH}}` or `target: {{TASK: PATH}}`); or aim at a domain: {group}.{attr}=DOMAIN "
                                      f"(domains: {', '.join(domains)})")
                if spec == "val":
                    raise ConfigError(f"{group}.{attr}=val: the run has no validation set (no domain has `val` files)"
                                      f" and no domain named 'val' (domains: {', '.join(domains)})")
                import difflib

                close = difflib.get_close_matches(spec, list(domains), n=1)
                raise ConfigError(f"{group}.{attr}={spec}: the data config has no target set and no domain named "
                                  f"{spec!r} (domains: {', '.join(domains)}"
                                  + (f"; did you mean {close[0]!r}?" if close else "") + ")")
        spec = getattr(plugin, "reference_spec", None)
        if isinstance(spec, (str, os.PathLike)) and getattr(plugin, "reference", "") is None:
            from dataflex.run.reference import find_checkpoint

            try:
                find_checkpoint(spec)
            except FileNotFoundError as e:
                raise ConfigError(f"{group}.reference={spec}: {e}") from None


def instantiate_plugin(group: str, node):
    """A plugin built from its config group; a ValueError its constructor raises over its settings (sheared
    given neither reference) is the user's to fix: one `train: error: GROUP: ...` line, not Hydra's block."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise ConfigError(f"{group}: {cause}") from None
        raise
