"""Typed plugin settings: every key a mixer, selector or reweighter takes, checked by type and range before
any data is read (`launch/train.py` calls `check_settings` for each plugin group while it settles the config).

A plugin's types come from its `__init__` signature (its base classes' too, for `**kw`); ranges and choices
from its `SETTINGS` class attribute, merged along the class hierarchy:

    SETTINGS = {"alpha": "(0, 1)", "warmup_steps": "[0, inf)", "variant": ("paper", "cumulative")}

An interval is written with `(`/`[` and `)`/`]` for open and closed ends; a tuple lists the allowed strings.
A wrong value is one line: `mixer.alpha=abc: expected a number in (0, 1)` (a ConfigError: exit 2)."""
from __future__ import annotations

import difflib
import inspect
import math
import re
from pathlib import Path
from typing import Mapping

from dataflex.utils.errors import ConfigError

WEIGHT_NAMES = ("uniform", "size")
MIXTURE_SUFFIXES = (".json", ".yaml", ".yml")


def _interval(spec: str):
    m = re.fullmatch(r"\s*([\[(])\s*(-?inf|-?[\d.e+-]+)\s*,\s*(-?inf|-?[\d.e+-]+)\s*([\])])\s*", spec)
    if not m:
        raise ValueError(f"bad interval {spec!r}")
    return m.group(1) == "(", float(m.group(2)), float(m.group(3)), m.group(4) == ")"


def _in_interval(value: float, spec: str) -> bool:
    lo_open, lo, hi, hi_open = _interval(spec)
    return (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)


def _describe_interval(spec: str, integer: bool) -> str:
    lo_open, lo, hi, hi_open = _interval(spec)
    what = "an integer" if integer else "a number"
    if math.isinf(hi):
        lo_text = int(lo) if integer or lo.is_integer() else lo
        return f"{what} {'>' if lo_open else '>='} {lo_text}"
    return f"{what} in {spec.replace(' ', '').replace(',', ', ')}"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _weights_problem(v) -> str | None:
    """None when `v` is a weight spec: 'uniform', 'size', a mixture file, {domain: weight} or [weights]."""
    if isinstance(v, str):
        if v in WEIGHT_NAMES or Path(v).suffix in MIXTURE_SUFFIXES or Path(v).is_file():
            return None
        close = difflib.get_close_matches(v, WEIGHT_NAMES, n=1)
        return ("uniform, size, {domain: weight}, [weights] or a mixture file (.json/.yaml)"
                + (f"; did you mean {close[0]!r}?" if close else ""))
    values = list(v.values()) if isinstance(v, Mapping) else list(v) if isinstance(v, (list, tuple)) else None
    if values is None or not values or not all(_is_num(x) for x in values):
        return "uniform, size, {domain: weight}, [weights] or a mixture file (.json/.yaml)"
    if any(x < 0 for x in values) or sum(values) <= 0:
        return "non-negative weights with a positive sum"
    return None


def _type_problem(annotation: str, value, rule) -> str | None:
    """What `value` should have been, or None when it fits the annotation (a string: `from __future__`)."""
    ann = annotation.replace(" ", "")
    optional = ann.startswith("Optional[") or "None" in ann.split("|")
    if optional:
        if value is None:
            return None
        ann = ann[len("Optional["):-1] if ann.startswith("Optional[") else "|".join(
            a for a in ann.split("|") if a != "None")
    if isinstance(rule, tuple):
        return None if value in rule else "one of " + ", ".join(map(str, rule))
    if ann == "bool":
        return None if isinstance(value, bool) else "true or false"
    if ann in ("int", "float"):
        integer = ann == "int"
        ok = _is_int(value) if integer else _is_num(value)
        if ok and (rule is None or _in_interval(value, rule)):
            return None
        if rule is None:
            return "an integer" if integer else "a number"
        return _describe_interval(rule, integer)
    if "WeightSpec" in ann:
        return _weights_problem(value)
    if ann == "str":
        return None if isinstance(value, str) else "a string"
    if ann.startswith("Union[str,Sequence[str]]") or ann == "Union[str,Sequence[str]]":
        ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value))
        return None if ok else "a name or a list of names"
    if ann.startswith("Mapping["):
        ok = isinstance(value, Mapping) and all(_is_num(x) for x in value.values())
        return None if ok else "a mapping {domain: number}"
    return None


def parameters(cls) -> dict:
    """{name: (annotation string, default)} of every keyword `cls(...)` takes, its bases' for `**kw`."""
    out: dict = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        init = inspect.unwrap(init)
        sig = inspect.signature(init)
        for name, p in sig.parameters.items():
            if name == "self" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or name in out:
                continue
            ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", "")
            out[name] = ("" if p.annotation is inspect.Parameter.empty else ann, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values()):
            break
    for name, spec in getattr(cls, "EXTRA_PARAMETERS", {}).items():
        out.setdefault(name, spec)
    return out


def rules(cls) -> dict:
    merged: dict = {}
    for klass in reversed(cls.__mro__):
        merged.update(getattr(klass, "SETTINGS", {}) or {})
    return merged


def check_settings(cls, given: Mapping, prefix: str) -> None:
    """Every key of `given` (a plugin group's config, `_target_` aside) is a setting of `cls` with a value of
    its type and range; raises ConfigError naming `prefix.key=value` and what is allowed."""
    params, allowed = parameters(cls), rules(cls)
    for key, value in given.items():
        if key.startswith("_") and key.endswith("_"):
            continue
        if key not in params:
            close = difflib.get_close_matches(key, list(params), n=1)
            raise ConfigError(f"{prefix}.{key}: {cls.__name__} has no such setting"
                              + (f" (did you mean {prefix}.{close[0]}?)" if close else "")
                              + f"; its settings: {', '.join(sorted(params))}")
        annotation, default = params[key]
        if not annotation and isinstance(default, str):
            annotation = "Union[str, Sequence[str]]"
        problem = _type_problem(annotation, value, allowed.get(key))
        if problem:
            raise ConfigError(f"{prefix}.{key}={_show(value)}: expected {problem}")


def _show(value) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)
