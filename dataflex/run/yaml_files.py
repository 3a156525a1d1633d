"""YAML files a command line makes Hydra read, checked for alias bombs before Hydra composes them."""
from __future__ import annotations

import os
import sys

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
