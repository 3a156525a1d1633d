"""The architecture, read off the tree and kept there: which package may import which, no import cycle
(module-level and function-level imports both count, `if TYPE_CHECKING:` ones too), no Hydra below `run`,
and dataprep standing alone below dataflex."""
import ast
import collections
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> the dataflex packages it may import (besides itself); `dataprep` sits below all of dataflex
PLUGINS = {"mixers", "selectors", "reweighters"}
BELOW = {
    "utils": set(),
    "core": {"utils"},
    "models": {"utils", "core"},
    "grad": {"utils", "core", "models"},
    "data": {"utils", "core"},
    "session": {"utils", "core", "models", "grad", "data"},
    "mixers": {"utils", "core", "models", "grad", "data"},
    "selectors": {"utils", "core", "models", "grad", "data"},
    "reweighters": {"utils", "core", "models", "grad", "data"},
    "backends": {"utils", "core", "models", "grad", "data", "session"},
    "run": {"utils", "core", "models", "grad", "data", "session", "backends"} | PLUGINS,
    "integrations": {"utils", "core", "models", "grad", "data", "session", "backends", "run"} | PLUGINS,
    "report": {"utils", "run"},
    "recipes": {"utils", "core", "models", "grad", "data", "session", "backends", "run", "integrations", "report"}
    | PLUGINS,
    "__main__": {"recipes"},
}
NO_HYDRA = {"utils", "core", "models", "grad", "data", "session", "backends"} | PLUGINS


def modules() -> dict:
    out = {}
    for pkg in ("dataflex", "dataprep"):
        for p in (ROOT / pkg).rglob("*.py"):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(mods: dict) -> dict:
    """module -> {imported module or third-party top-level name}, every import statement in the file."""
    graph = collections.defaultdict(set)
    for name, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                while t not in mods and "." in t and t.split(".")[0] in ("dataflex", "dataprep"):
                    t = t.rpartition(".")[0]
                if t != name:
                    graph[name].add(t if t in mods else t.split(".")[0])
    return graph


def layer(module: str):
    parts = module.split(".")
    return parts[1] if parts[0] == "dataflex" and len(parts) > 1 else None


MODS = modules()
GRAPH = imports(MODS)


def test_no_import_cycle():
    """Tarjan's strongly connected components over the internal import graph: every one is a single module."""
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v), on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODS or w == "dataflex":
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in MODS:
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_packages_import_only_what_lies_below_them():
    bad = []
    for m, targets in GRAPH.items():
        mine = layer(m)
        if mine is None or m.startswith("dataflex._moved"):
            continue
        for t in targets:
            theirs = layer(t)
            if t == "dataflex" or m.split(".")[:2] == ["dataflex", "__init__"]:
                if t == "dataflex":
                    bad.append(f"{m} imports the dataflex package root (import the module that defines the name)")
                continue
            if theirs and theirs != mine and theirs not in BELOW.get(mine, set()):
                bad.append(f"{m} ({mine}) imports {t} ({theirs})")
    assert not bad, "\n".join(bad)


def test_dataprep_imports_nothing_from_dataflex():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() if m.startswith("dataprep") for t in ts
           if t.startswith("dataflex")]
    assert not bad, "\n".join(bad)


def test_no_hydra_below_run():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() if layer(m) in NO_HYDRA for t in ts if t == "hydra"]
    assert not bad, "\n".join(bad)


def test_every_package_has_a_place_in_the_rule():
    pkgs = {layer(m) for m in MODS if layer(m) and (MODS[m].name == "__init__.py" and m.count(".") == 1)}
    assert pkgs <= set(BELOW), f"packages outside the layer rule: {sorted(pkgs - set(BELOW))}"


@pytest.mark.parametrize("low,high", [("core", "grad"), ("grad", "session"), ("data", "mixers"), ("session", "run")])
def test_the_checker_sees_a_violation(low, high, tmp_path, monkeypatch):
    """The checker itself: an upward import planted in a copy of a graph is reported."""
    planted = dict(GRAPH)
    victim = next(m for m in MODS if layer(m) == low)
    target = next(m for m in MODS if layer(m) == high)
    planted[victim] = set(GRAPH.get(victim, set())) | {target}
    monkeypatch.setattr(__import__(__name__), "GRAPH", planted)
    with pytest.raises(AssertionError, match="imports"):
        test_packages_import_only_what_lies_below_them()


QUIET = """
import warnings, sys
import dataflex
from dataflex.data import load_domains
domains = load_domains({"domains": {"a": {"train": sys.argv[1]}}}, 16, progress=False)
assert len(domains.train["a"]) > 0
"""


def test_import_and_first_load_domains_print_no_third_party_warning(tmp_path):
    """`python -X importtime -c 'import dataflex'` and the first load_domains (which opens megatron-core's
    IndexedDataset) print nothing but the import timings."""
    import os
    import subprocess
    import sys

    data = tmp_path / "a.jsonl"
    data.write_text("".join(f'{{"text": "document number {i} with a few words"}}\n' for i in range(20)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["DATAFLEX_CACHE"] = str(tmp_path / "cache")
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import dataflex"], capture_output=True, text=True,
                         env=env, check=True)
    assert [x for x in imp.stderr.splitlines() if not x.startswith("import time:")] == []
    first = subprocess.run([sys.executable, "-c", QUIET, str(data)], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    assert "Warning" not in first.stderr and "warn" not in first.stderr, first.stderr


def test_old_module_paths_import_with_a_deprecation_warning():
    """Every module path of 0.1 that moved still imports for one release, warning where it went."""
    import importlib
    import subprocess
    import sys

    from dataflex._moved import MOVED

    code = """
import importlib, sys, warnings
from dataflex._moved import MOVED
bad = []
for old, homes in MOVED.items():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    if not any(issubclass(w.category, DeprecationWarning) and homes[0] in str(w.message) for w in seen):
        bad.append(old)
print("moved without a warning:", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "moved without a warning: []" in out.splitlines(), out     # (W&B may print a line of its own)
    checks = importlib.import_module("dataflex.checks")
    from dataflex.run.checkpoints import mark_complete
    from dataflex.utils.errors import UserError
    assert checks.UserError is UserError and checks.mark_complete is mark_complete
    assert "dataflex.checks" in MOVED


def test_public_names_keep_working():
    import dataflex
    from dataflex.mixers import BanditMixer
    from dataflex.session.flex import DataFlex

    assert dataflex.DataFlex is DataFlex and dataflex.mixers.BanditMixer is BanditMixer
    from dataflex import (DataAwareSampler, LossWrapper, MixtureDataset, PerSampleGrads,  # noqa: F401
                          TorchInterface, load_domains, per_sample_grads, selectors)
    assert set(dataflex.__all__) <= set(dir(dataflex))
