"""Finished runs under a folder, grouped into strategies: runs whose configuration differs only in the seed.

A run is a folder holding `summary.json` (and `metrics.jsonl`, `config.yaml`, `.hydra/overrides.yaml`,
`ledger/`). Two runs belong to one strategy when their Hydra overrides are the same once `trainer.seed`
and settings that never change training (logging, plots, run folders) are left out; without Hydra's
record, their config.yaml minus the seed. Both layouts work:

    multirun/DATE/TIME/{0,1,...}              python launch/train.py -m +mixer=bandit,static trainer.seed=0,1,2
    multirun/sweeps/FAMILY/vI/SEED            bench/sweeps.py: one folder per strategy, one per seed in it
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dataflex.run.outputs import strategy_label

PLUGIN_GROUPS = ("mixer", "selector", "reweighter")
# overrides that never change what a run learns: left out of the strategy key and the label
IGNORED = ("trainer.seed", "hydra.", "logger", "trainer.plot", "trainer.overwrite", "trainer.resume",
           "trainer.ledger_flush_every", "trainer.checkpoint_every", "trainer.check_ranks_every")


@dataclass
class Run:
    dir: Path
    summary: dict
    history: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    overrides: Optional[list] = None      # Hydra's task overrides; None without .hydra/overrides.yaml

    @property
    def seed(self):
        return (self.config.get("trainer") or {}).get("seed")

    @property
    def strategy(self) -> dict:
        return self.summary.get("strategy") or {}

    def evals(self) -> list:
        """[(step, {domain: validation loss}, target loss or None)] in step order (the last line per step wins)."""
        by_step = {}
        for r in self.history:
            if "val_loss" in r and r["val_loss"]:
                by_step[r["step"]] = (r["step"], r["val_loss"], r.get("target_loss"))
        return [by_step[s] for s in sorted(by_step)]

    def target_tasks(self) -> dict:
        """{subtask: target loss} at the last evaluation of a target with subtasks; {} otherwise."""
        return next((r["target_loss_by_task"] for r in reversed(self.history) if r.get("target_loss_by_task")), {})

    def pool_kept(self) -> dict:
        """{domain: fraction of its pool kept} for a pool selector (less, near, tsds, cluster_less, random
        with scope=pool), from its last `selector/kept/DOMAIN` metrics and data.json's pool sizes; {} otherwise."""
        kept = next(({k.split("/", 2)[2]: v for k, v in r.items() if k.startswith("selector/kept/")}
                     for r in reversed(self.history) if any(k.startswith("selector/kept/") for k in r)), {})
        data = self.dir / "data.json"
        if not kept or not data.exists():
            return {}
        sizes = dict(zip(*(json.loads(data.read_text())[k] for k in ("names", "sizes"))))
        return {d: n / sizes[d] for d, n in kept.items() if sizes.get(d)}

    def ledger(self, columns: list):
        """The run's ledger rows (pandas), only `columns`; None when it has none."""
        folder = self.dir / "ledger"
        if not folder.is_dir() or not any(folder.glob("*.parquet")):
            return None
        import pandas as pd

        return pd.read_parquet(folder, columns=columns)


@dataclass
class Strategy:
    label: str
    key: tuple
    runs: list

    @property
    def plugins(self) -> dict:
        return self.runs[0].strategy

    @property
    def config(self) -> dict:
        return self.runs[0].config


def natural_key(path: Path) -> list:
    """v2 before v10, 9 before 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text()) if path.is_file() else None


def load_run(folder: Path) -> Run:
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    metrics = folder / "metrics.jsonl"
    history = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    config = _yaml(folder / "config.yaml") or _yaml(folder / ".hydra" / "config.yaml") or {}
    overrides = _yaml(folder / ".hydra" / "overrides.yaml")
    return Run(folder, summary, history, config, list(overrides) if overrides is not None else None)


def find_runs(root: Path) -> list:
    """Every finished run below `root` (a folder with summary.json), in natural path order."""
    return [load_run(p.parent) for p in sorted(Path(root).rglob("summary.json"), key=natural_key)]


def _ignored(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return any(key == i or key.startswith(i if i.endswith(".") else i + ".") for i in IGNORED)


def strategy_key(run: Run) -> tuple:
    if run.overrides is not None:
        return tuple(sorted(o for o in run.overrides if not _ignored(o)))
    config = json.loads(json.dumps(run.config))
    (config.get("trainer") or {}).pop("seed", None)
    config.pop("logger", None)
    return (json.dumps(config, sort_keys=True, default=str),)


def _short(override: str) -> str:
    """`mixer.reference=/a/b/c/reference` -> `reference=c/reference`: the group prefix and long paths shortened."""
    key, _, value = override.lstrip("+~").partition("=")
    for g in PLUGIN_GROUPS:
        if key.startswith(g + "."):
            key = key[len(g) + 1:]
    if "/" in value:   # the last two parts, three when one of them is an interpolation (${trainer.seed})
        parts = Path(value).parts
        value = "/".join(parts[-3:] if any(x.startswith("$") for x in parts[-2:]) else parts[-2:])
    for seed in ("${trainer.seed}", "$\\{trainer.seed\\}"):    # as given, and as Hydra records it (escaped)
        value = value.replace(seed, "SEED")                   # "$" would start mathtext in a legend
    return f"{key}={value}"


def _is_choice(override: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in PLUGIN_GROUPS


def group_runs(runs: list) -> list:
    """Strategies in order of first appearance; each label is the plugins in use plus the overrides that
    set it apart from the others (those all strategies share are left out), unique over the sweep."""
    groups: dict = {}
    for run in runs:
        groups.setdefault(strategy_key(run), []).append(run)
    for members in groups.values():
        members.sort(key=lambda r: (not isinstance(r.seed, (int, float)), r.seed if isinstance(r.seed, (int, float))
                                    else 0, natural_key(r.dir)))
    keys = list(groups)
    shared = set.intersection(*(set(k) for k in keys)) if keys and groups[keys[0]][0].overrides is not None else set()
    labels = []
    for key in keys:
        base = strategy_label(groups[key][0].strategy)
        hydra = groups[key][0].overrides is not None
        extra = [_short(o) for o in key if hydra and o not in shared and not _is_choice(o)]
        labels.append(base + (f" ({', '.join(extra)})" if extra else ""))
    for i, label in enumerate(labels):      # still alike (e.g. no Hydra record): add the folder
        if labels.count(label) > 1:
            labels[i] = f"{label} [{groups[keys[i]][0].dir.parent.name}]"
    return [Strategy(label, key, groups[key]) for label, key in zip(labels, keys)]


def is_static_uniform(s: Strategy) -> bool:
    mixer = s.config.get("mixer") or {}
    return s.plugins.get("mixer") == "static" and str(mixer.get("weights", "uniform")) == "uniform" \
        and float(mixer.get("temperature", 1.0)) == 1.0 and not s.plugins.get("selector") \
        and not s.plugins.get("reweighter")


def is_plain(s: Strategy) -> bool:
    return not any(s.plugins.get(g) for g in PLUGIN_GROUPS)


def is_dynamic(s: Strategy) -> bool:
    """Data decisions that change with training: a mixer other than static, or any selector or reweighter."""
    mixer = s.plugins.get("mixer")
    return bool((mixer and mixer != "static") or s.plugins.get("selector") or s.plugins.get("reweighter"))


def pick_baseline(strategies: list, label: Optional[str] = None) -> Strategy:
    """`label` (exact, else the one strategy whose label contains it); by default the static uniform
    mixture, else the run without plugins (size-proportional, unweighted), else the first."""
    if label:
        exact = [s for s in strategies if s.label == label]
        partial = [s for s in strategies if label in s.label]
        if exact or len(partial) == 1:
            return (exact or partial)[0]
        known = "; ".join(s.label for s in strategies)
        raise ValueError(f"--baseline {label!r} matches {len(partial)} strategies (known: {known})")
    for test in (is_static_uniform, is_plain):
        found = [s for s in strategies if test(s)]
        if found:
            return found[0]
    return strategies[0]


COST_KEYS = (("logger", "name"), ("backend", "name"), ("trainer", "nprocs"), ("trainer", "eval_every"),
             ("trainer", "max_val_samples"), ("trainer", "global_batch_size"), ("model", "seq_len"))


def cost_mismatch(strategies: list) -> list:
    """What makes the runs' wall times incomparable: ["logger.name: wandb vs none", ...] over every run's
    config (a logger that uploads, evaluations more often, another back end or rank count all cost time
    that is not the strategy's), plus runs made on different machines (summary.json's `host`, where
    recorded). Empty when the runs were made alike."""
    seen: dict = {}
    for s in strategies:
        for r in s.runs:
            for section, key in COST_KEYS:
                part = r.config.get(section)
                value = part.get(key) if isinstance(part, dict) else None
                seen.setdefault(f"{section}.{key}", set()).add(json_key(value))
            seen.setdefault("host", set()).add(json_key(r.summary.get("host")))
    return [f"{k}: {' vs '.join(sorted(v))}" for k, v in seen.items() if len(v) > 1]


def json_key(value) -> str:
    return "unset" if value is None else str(value)
