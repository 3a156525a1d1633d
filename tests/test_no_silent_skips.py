"""A package `make setup` installs is imported by the tests, never `pytest.importorskip`ed: a broken install
must fail the suite, not turn its tests into skips. `importorskip` stays for what the default install does
not have (Transformer Engine on a CUDA machine)."""
from __future__ import annotations

import ast
import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0)).lower()


def installed_by_setup(pyproject: Path = ROOT / "pyproject.toml") -> set[str]:
    """Distributions `make setup` installs: the dependencies and every extra `dev` names (recursively)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    extras, own = project.get("optional-dependencies", {}), _name(project["name"])
    names, todo = {_name(r) for r in project.get("dependencies", [])}, ["dev"]
    while todo:
        for req in extras.get(todo.pop(), []):
            if _name(req) == own:        # dataflex-train[hf,embed,...]
                todo += [e.strip() for e in req[req.index("[") + 1:req.index("]")].split(",")]
            else:
                names.add(_name(req))
    return names


def silent_skips(paths, required: set[str]) -> list[str]:
    """'file:line module' for each `pytest.importorskip("module")` whose distribution is in `required`."""
    owners = packages_distributions()
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                module = node.args[0].value
                if {_name(d) for d in owners.get(module.split(".")[0], [])} & required:
                    found.append(f"{Path(path).name}:{node.lineno} {module}")
    return found


def test_required_packages_are_imported_not_skipped():
    required = installed_by_setup()
    assert {"torch", "deepspeed", "transformers", "peft"} <= required, required     # the parse reads the extras
    assert silent_skips(sorted((ROOT / "tests").glob("*.py")), required) == []


def test_the_checker_sees_a_silent_skip(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text('import pytest\n\n\ndef test_x():\n    pytest.importorskip("torch")\n'
                       '    pytest.importorskip("transformer_engine")\n')
    assert silent_skips([planted], installed_by_setup()) == ["test_planted.py:5 torch"]
